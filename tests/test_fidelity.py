"""Zero-shot fidelity: the metrics on toy models and the real MiniLM, the guards, the workflow stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas
import pytest
import torch
from matplotlib.image import imread

from conftest import DATA, run_snakemake
from lmprune.data import DataError, read_text_file
from lmprune.fidelity import TABLE_COLUMNS, fidelity_table, held_out_lines, measure_fidelity
from lmprune.models import ModelSourceError, load_model, save_checkpoint
from lmprune.pruning import prune_model
from test_workflow import planned_jobs, write_config

FAMILIES = ("encoder", "decoder", "encoder-decoder")

# Lines of very different token counts, so that a batch of them carries a lot of padding.
MIXED_LINES = [
    "the city",
    "the school was new and the city was old , but the university was known in the world .",
    "one",
    "after the first years of the national state , the city had more schools than most other "
    "cities of the united state , and many of them were used for two years only .",
    "his new school",
]


def measure(checkpoint: Path, dense: Path, lines=MIXED_LINES, **settings) -> dict:
    return measure_fidelity(
        checkpoint, dense, lines, **({"max_length": 64, "batch_size": 8, "device": "cpu"} | settings)
    )


def last_layer_norm(model: torch.nn.Module) -> torch.nn.LayerNorm:
    """Return the LayerNorm whose output is the final hidden state that fidelity compares."""
    if hasattr(model, "bert"):
        return model.bert.encoder.layer[-1].output.LayerNorm
    if hasattr(model, "transformer"):
        return model.transformer.ln_f
    return model.model.encoder.layers[-1].final_layer_norm


def scaled_checkpoint(source: Path, folder: Path, scale: float) -> Path:
    """Save a copy of ``source`` whose final hidden states are exactly ``scale`` times the dense ones."""
    model = load_model(source)
    norm = last_layer_norm(model)
    with torch.no_grad():
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
    save_checkpoint(model, source, folder)
    return folder


def pruned_checkpoint(source: Path, folder: Path, sparsity: float) -> Path:
    model = load_model(source)
    prune_model(model, "magnitude", sparsity)
    save_checkpoint(model, source, folder)
    return folder


# held_out_lines -------------------------------------------------------------------------------


def test_held_out_lines_skips_blanks_and_headings():
    texts = [
        " \n",
        " = Robert Boulter = \n",
        " Robert Boulter is an English actor . \n",
        "",
        " = = Career = = ",
        " = = = 2000 – 2005 = = = ",
        " = <unk> for the next round ",
        "   ",
        " He appeared in 2006 . ",
        " Not used . ",
    ]

    lines = held_out_lines(texts, 3)

    assert lines == ["Robert Boulter is an English actor .", "= <unk> for the next round", "He appeared in 2006 ."]


def test_held_out_lines_wikitext_test_split():
    texts = read_text_file(DATA / "wikitext-2" / "test.txt").texts

    lines = held_out_lines(texts, 50)

    assert len(lines) == 50
    assert lines[0].startswith("Robert <unk> is an English film")
    assert all(line and line == line.strip() for line in lines)
    assert not any(line.startswith("= ") and line.endswith(" =") for line in lines)


def test_held_out_lines_too_many_samples():
    texts = [" = Title = ", " first line ", "", " second line "]

    with pytest.raises(DataError) as error:
        held_out_lines(texts, 5, source="data/test.txt")

    message = str(error.value)
    assert "samples=5" in message
    assert "the 2 held-out lines" in message
    assert "data/test.txt" in message
    assert "fidelity.samples" in message
    assert "at most 2" in message


@pytest.mark.parametrize("samples", [0, -1, True, 2.0, "3"])
def test_held_out_lines_invalid_samples(samples):
    with pytest.raises(DataError, match="samples must be a positive integer"):
        held_out_lines(["a line"], samples)


# measure_fidelity: exact cases ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_models_agree(toy_models, family):
    result = measure(toy_models[family], toy_models[family])

    assert result["relative_error"] == 0.0
    assert result["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result["min_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result["lines"] == len(MIXED_LINES)
    assert result["tokens"] >= len(MIXED_LINES)
    assert result["device"] == "cpu"


def test_hidden_states_named_per_family(toy_models):
    names = {family: measure(toy_models[family], toy_models[family], lines=["the city"])["hidden_states"] for family in FAMILIES}

    assert names == {
        "encoder": "BertModel last_hidden_state",
        "decoder": "GPT2Model last_hidden_state",
        "encoder-decoder": "BartModel encoder last_hidden_state",
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("scale", "relative_error", "cosine"), [(0.5, 0.5, 1.0), (-1.0, 2.0, -1.0)])
def test_scaled_outputs_give_known_values(tmp_path, toy_models, family, scale, relative_error, cosine):
    # Scaling the last LayerNorm's weight and bias by c makes H_pruned = c * H_dense exactly
    # (c is a power of two or -1), so ||H_pruned - H_dense|| / ||H_dense|| = |c - 1| and every
    # line's cosine is the sign of c.
    checkpoint = scaled_checkpoint(toy_models[family], tmp_path / "scaled", scale)

    result = measure(checkpoint, toy_models[family])

    assert result["relative_error"] == pytest.approx(relative_error, rel=1e-6)
    assert result["cosine"] == pytest.approx(cosine, abs=1e-9)
    assert result["min_cosine"] == pytest.approx(cosine, abs=1e-9)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_error_grows_with_sparsity(tmp_path, toy_models, family):
    results = [
        measure(pruned_checkpoint(toy_models[family], tmp_path / f"s{sparsity}", sparsity), toy_models[family])
        for sparsity in (0.2, 0.5, 0.8)
    ]
    errors = [result["relative_error"] for result in results]

    assert errors[0] > 0
    assert errors[0] < errors[1] < errors[2]
    assert results[2]["cosine"] < 1.0
    assert results[2]["min_cosine"] <= results[2]["cosine"]


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_changes_nothing(tmp_path, toy_models, family):
    checkpoint = pruned_checkpoint(toy_models[family], tmp_path / "pruned", 0.5)

    padded = measure(checkpoint, toy_models[family], batch_size=len(MIXED_LINES))
    one_by_one = measure(checkpoint, toy_models[family], batch_size=1)

    assert padded["tokens"] == one_by_one["tokens"]
    assert padded["relative_error"] > 0
    assert padded["relative_error"] == pytest.approx(one_by_one["relative_error"], rel=1e-5)
    assert padded["cosine"] == pytest.approx(one_by_one["cosine"], abs=1e-6)
    assert padded["min_cosine"] == pytest.approx(one_by_one["min_cosine"], abs=1e-6)


def test_smaller_ffn_checkpoint_loads(tmp_path, toy_models):
    # The shape a structured FFN method leaves: half the neurons of every FFN, config updated.
    model = load_model(toy_models["encoder"])
    kept_neurons = model.config.intermediate_size // 2
    for layer in model.bert.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        layer.intermediate.dense = torch.nn.Linear(up.in_features, kept_neurons)
        layer.output.dense = torch.nn.Linear(kept_neurons, down.out_features)
        with torch.no_grad():
            layer.intermediate.dense.weight.copy_(up.weight[:kept_neurons])
            layer.intermediate.dense.bias.copy_(up.bias[:kept_neurons])
            layer.output.dense.weight.copy_(down.weight[:, :kept_neurons])
            layer.output.dense.bias.copy_(down.bias)
    model.config.intermediate_size = kept_neurons
    save_checkpoint(model, toy_models["encoder"], tmp_path / "ffn")

    result = measure(tmp_path / "ffn", toy_models["encoder"])

    assert 0 < result["relative_error"] < float("inf")
    assert -1.0 <= result["min_cosine"] <= result["cosine"] <= 1.0


def test_minilm_tokens_and_identity(minilm_folder):
    from transformers import AutoTokenizer

    lines = held_out_lines(read_text_file(DATA / "wikitext-2" / "test.txt").texts, 6)

    result = measure(minilm_folder, minilm_folder, lines=lines, max_length=128, batch_size=4)

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    expected_tokens = sum(len(ids) for ids in tokenizer(lines, truncation=True, max_length=128)["input_ids"])
    assert result["tokens"] == expected_tokens
    assert result["relative_error"] == 0.0
    assert result["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result["hidden_states"] == "BertModel last_hidden_state"


# measure_fidelity: guards ---------------------------------------------------------------------


def test_checkpoint_without_tokenizer(tmp_path, toy_models):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(toy_models["encoder"] / name, folder / name)

    with pytest.raises(ModelSourceError) as error:
        measure(folder, toy_models["encoder"])

    assert "has no tokenizer" in str(error.value)
    assert str(folder) in str(error.value)


def test_tokenizer_of_special_tokens_only(tmp_path, toy_models):
    from transformers import BertTokenizerFast
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder = tmp_path / "empty-vocabulary"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(toy_models["encoder"] / name, folder / name)
    vocabulary = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    tokenizer = BertTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="[UNK]")))
    tokenizer.save_pretrained(folder)

    with pytest.raises(ModelSourceError, match="all of them special tokens"):
        measure(folder, toy_models["encoder"])


def test_empty_text_list(toy_models):
    with pytest.raises(DataError, match="no held-out lines"):
        measure(toy_models["encoder"], toy_models["encoder"], lines=[])


def test_blank_line_rejected(toy_models):
    with pytest.raises(DataError, match="line 1 is blank"):
        measure(toy_models["encoder"], toy_models["encoder"], lines=["the city", "  "])


def test_max_length_over_positions(toy_models):
    with pytest.raises(ValueError, match="max_length=1000 exceeds the model's max_position_embeddings=256"):
        measure(toy_models["decoder"], toy_models["decoder"], max_length=1000)


@pytest.mark.parametrize("batch_size", [0, 1.5])
def test_invalid_batch_size(toy_models, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        measure(toy_models["encoder"], toy_models["encoder"], batch_size=batch_size)


def test_hidden_size_mismatch(tmp_path, toy_models):
    from lmprune.toy import build_untrained_model

    narrow = build_untrained_model("encoder", tmp_path / "narrow", hidden_size=32)

    with pytest.raises(ModelSourceError, match="hidden size 32 but the dense model"):
        measure(narrow, toy_models["encoder"])


# fidelity_table -------------------------------------------------------------------------------


def test_fidelity_table_rows_sorted():
    base = {"relative_error": 0.1, "cosine": 0.9, "min_cosine": 0.8, "lines": 4, "tokens": 40, "device": "cpu", "untrained": False}
    records = [
        base | {"model": "minilm", "method": "magnitude", "sparsity": 0.5, "extra": 1},
        base | {"model": "minilm", "method": "magnitude", "sparsity": 0.0},
    ]

    table = fidelity_table(records)

    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["sparsity"]) == [0.0, 0.5]


def test_fidelity_table_missing_key():
    with pytest.raises(ValueError, match="fidelity record 0 lacks cosine"):
        fidelity_table([{column: 0 for column in TABLE_COLUMNS if column != "cosine"}])


# Workflow -------------------------------------------------------------------------------------

FIDELITY_TARGETS = (
    "results/tables/fidelity.csv",
    "results/figures/fidelity_relative_error.png",
    "results/figures/fidelity_cosine.png",
)


def fidelity_config(folder: Path, **settings) -> Path:
    return write_config(folder, fidelity={"enabled": True, "samples": 32}, **settings)


def test_default_target_plans_fidelity(tmp_path):
    # With the benchmarks on, plot_bench's results/figures/{figure}.png must not claim the
    # fidelity figures.
    config = fidelity_config(tmp_path, sparsities=[0.0, 0.5], tasks=["clm", "qnli"])

    plan = run_snakemake(tmp_path, "--dry-run", "--configfile", str(config), env={"LMPRUNE_DATA_DIR": str(DATA)})

    jobs = planned_jobs(plan)
    assert jobs["measure_fidelity"] == 2
    assert jobs["table_fidelity"] == 1
    assert jobs["plot_fidelity"] == 2
    assert jobs["plot_bench"] == 5
    assert jobs["fetch_data"] == 2


@pytest.fixture(scope="module")
def minilm_fidelity_run(tmp_path_factory) -> Path:
    """Run the fidelity stage on the real MiniLM at sparsities 0 and 0.5 and return its folder."""
    workdir = tmp_path_factory.mktemp("minilm-fidelity")
    config = fidelity_config(workdir, sparsities=[0.0, 0.5])
    # Targets go before --configfile, which takes every argument after it as a file.
    run_snakemake(workdir, *FIDELITY_TARGETS, "--configfile", str(config), env={"LMPRUNE_DATA_DIR": str(DATA)})
    return workdir


@pytest.mark.slow
def test_minilm_dense_checkpoint_matches(minilm_fidelity_run):
    record = json.loads((minilm_fidelity_run / "results/fidelity/minilm/magnitude/s0.json").read_text())

    assert record["relative_error"] == 0.0
    assert record["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert record["sparsity"] == 0.0
    assert record["lines"] == 32


@pytest.mark.slow
def test_minilm_pruned_checkpoint_record(minilm_fidelity_run):
    record = json.loads((minilm_fidelity_run / "results/fidelity/minilm/magnitude/s50.json").read_text())

    assert record["model"] == "minilm"
    assert record["method"] == "magnitude"
    assert record["sparsity"] == 0.5
    assert record["untrained"] is False
    assert record["relative_error"] > 0.01
    assert record["cosine"] < 0.999
    assert record["min_cosine"] <= record["cosine"]
    assert record["lines"] == 32
    assert record["tokens"] > 32
    assert record["hidden_states"] == "BertModel last_hidden_state"
    assert record["text"]["path"] == str((DATA / "wikitext-2" / "test.txt").resolve())
    assert len(record["text"]["sha256"]) == 64
    assert len(record["dense"]["weights_sha256"]) == 64
    assert record["settings"]["samples"] == 32
    assert record["environment"]["device"] == record["device"] == "cpu"


@pytest.mark.slow
def test_minilm_fidelity_table_and_figures(minilm_fidelity_run):
    table = pandas.read_csv(minilm_fidelity_run / "results/tables/fidelity.csv")

    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["sparsity"]) == [0.0, 0.5]
    assert table["relative_error"].iloc[0] == 0.0
    assert table["relative_error"].iloc[1] > 0
    for name in ("fidelity_relative_error", "fidelity_cosine"):
        assert imread(minilm_fidelity_run / f"results/figures/{name}.png").shape[1] > 100
        assert (minilm_fidelity_run / f"logs/plot_fidelity/{name}.log").is_file()
    log = (minilm_fidelity_run / "logs/measure_fidelity/minilm/magnitude/s50.log").read_text()
    assert "sparsity 0.5" in log
    assert (minilm_fidelity_run / "logs/measure_fidelity/minilm/magnitude/s50.benchmark.tsv").is_file()


def write_wikitext(folder: Path, lines: list[str], test_file: bool = True) -> Path:
    """Write ``lines`` as wikitext-2/valid.txt of a local data folder, and as test.txt when ``test_file`` is true."""
    wikitext = folder / "wikitext-2"
    wikitext.mkdir(parents=True)
    text = "".join(f"{line}\n" for line in lines)
    (wikitext / "valid.txt").write_text(text)
    if test_file:
        (wikitext / "test.txt").write_text(text)
    return folder


def test_samples_over_available_lines(tmp_path, toy_models):
    data = write_wikitext(tmp_path / "data", [" = Title = ", " one line . ", "", " two lines . ", " three . "])
    config = write_config(
        tmp_path,
        models=[{"name": "tiny-bert", "family": "encoder", "source": {"path": str(toy_models["encoder"])}}],
        sparsities=[0.5],
        fidelity={"enabled": True, "samples": 10},
    )

    result = run_snakemake(
        tmp_path, "results/tables/fidelity.csv", "--configfile", str(config),
        check=False, env={"LMPRUNE_DATA_DIR": str(data)},
    )

    assert result.returncode != 0
    assert "Error in rule measure_fidelity" in result.stdout + result.stderr
    log = (tmp_path / "logs/measure_fidelity/tiny-bert/magnitude/s50.log").read_text()
    assert "samples=10 exceeds the 3 held-out lines" in log
    assert "at most 3" in log
    assert "UNTRAINED" in log
    assert not (tmp_path / "results/fidelity/tiny-bert/magnitude/s50.json").exists()


def test_data_folder_without_test_split(tmp_path):
    data = write_wikitext(tmp_path / "data", [" one line . "], test_file=False)
    config = fidelity_config(tmp_path, sparsities=[0.5])

    result = run_snakemake(tmp_path, "--dry-run", "--configfile", str(config), check=False, env={"LMPRUNE_DATA_DIR": str(data)})

    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Invalid data folder" in output
    assert "wikitext-2/test.txt" in output
    assert "LMPRUNE_DATA_DIR" in output
