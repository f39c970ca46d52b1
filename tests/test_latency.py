"""Latency of checkpoints against their dense source: the timing function, its guards, the workflow stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas
import pytest
import torch
import yaml
from matplotlib.image import imread

from conftest import run_snakemake
from lmprune import latency
from lmprune.latency import (
    LATENCY_COLUMNS,
    LatencySettingsError,
    is_2of4_sparse,
    latency_table,
    measure_latency,
    semi_structured_problems,
)
from lmprune.models import load_model

# Small enough for a few seconds per toy model on 2 shared CPU cores.
TINY = {"batch_size": 2, "seq_length": 16, "warmup": 2, "repeats": 5, "device": "cpu", "dtype": "auto"}
MODEL_KEYS = (
    "folder", "architecture", "parameters", "linear_zero_fraction", "untrained", "median_ms", "p90_ms",
    "mean_ms", "min_ms", "tokens_per_s", "sequences_per_s", "times_ms",
)


@pytest.fixture
def one_thread():
    """Time on one torch thread: with two threads on a loaded 2-core machine, single passes stall for tens of ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder-decoder"])
def test_toy_model_against_itself(family, toy_models, one_thread):
    folder = toy_models[family]

    # 15 passes per model: with 5, one burst of load from other processes moved the median 4x.
    result = measure_latency(folder, folder, **TINY | {"repeats": 15})

    for name in ("dense", "pruned"):
        record = result[name]
        assert set(MODEL_KEYS) <= set(record)
        assert len(record["times_ms"]) == 15
        assert 0 < record["min_ms"] <= record["median_ms"] <= record["p90_ms"]
        assert record["tokens_per_s"] == pytest.approx(2 * 16 / (record["median_ms"] / 1000))
        assert record["sequences_per_s"] == pytest.approx(2 / (record["median_ms"] / 1000))
        assert record["linear_zero_fraction"] == 0.0
        assert record["untrained"] is True
    assert result["dense"]["parameters"] == result["pruned"]["parameters"]
    assert result["speedup"] == pytest.approx(result["dense"]["median_ms"] / result["pruned"]["median_ms"])
    # The same model twice: the medians of the alternated passes agree within timing noise.
    assert 0.5 < result["speedup"] < 2.0
    assert result["device"] == "cpu"
    assert result["dtype"] == "float32"
    assert result["threads"] == 1
    assert result["tokens_per_batch"] == 32
    assert result["encoder_decoder"] is (family == "encoder-decoder")
    assert result["untrained"] is True
    assert result["method"] is None
    assert result["semi_structured"] == {"applicable": False}


def test_2of4_method_on_cpu_records_reason(toy_models, one_thread, caplog):
    folder = toy_models["encoder"]

    with caplog.at_level("WARNING", logger="lmprune.latency"):
        result = measure_latency(folder, folder, **TINY, method="magnitude-2of4")

    semi_structured = result["semi_structured"]
    assert semi_structured["applicable"] is True
    assert semi_structured["available"] is False
    assert "device is cpu" in semi_structured["reason"]
    assert "dtype is float32" in semi_structured["reason"]
    assert semi_structured["reason"] in caplog.text
    assert result["pruned"]["median_ms"] > 0


def test_method_read_from_pruning_json(tmp_path, toy_models, one_thread):
    checkpoint = tmp_path / "checkpoint"
    load_model(toy_models["decoder"]).save_pretrained(checkpoint)
    (checkpoint / "pruning.json").write_text(json.dumps({"method": "wanda-2of4"}))

    result = measure_latency(checkpoint, toy_models["decoder"], **TINY | {"repeats": 1})

    assert result["method"] == "wanda-2of4"
    assert result["semi_structured"]["available"] is False


def test_semi_structured_problems_by_condition(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert semi_structured_problems(cuda, torch.float16) == [
        "GPU compute capability is 7.5, and the 2:4 sparse kernels need 8.0 or newer"
    ]

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert semi_structured_problems(cuda, torch.float16) == []
    assert semi_structured_problems(cuda, torch.bfloat16) == []
    assert semi_structured_problems(cuda, torch.float32) == [
        "dtype is float32, and the 2:4 sparse kernels need float16 or bfloat16"
    ]

    monkeypatch.delattr(torch.sparse, "to_sparse_semi_structured")
    problems = semi_structured_problems(cuda, torch.float16)
    assert len(problems) == 1
    assert "has no torch.sparse.to_sparse_semi_structured" in problems[0]


def test_is_2of4_sparse_pattern():
    pattern = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]).repeat(3, 1)
    assert is_2of4_sparse(pattern)
    assert is_2of4_sparse(torch.zeros(2, 8))

    one_zero = pattern.clone()
    one_zero[1, 0] = 5.0
    assert not is_2of4_sparse(one_zero)
    assert not is_2of4_sparse(torch.zeros(2, 6))
    assert not is_2of4_sparse(torch.zeros(8))


def _write_2of4_toy(source: Path, folder: Path) -> Path:
    """Save a copy of a toy BERT whose encoder Linear weights keep the 2 largest of every 4."""
    model = load_model(source)
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                groups = module.weight.view(module.weight.shape[0], -1, 4)
                smallest = groups.abs().argsort(dim=-1)[..., :2]
                groups.scatter_(-1, smallest, 0.0)
    model.save_pretrained(folder)
    return folder


def test_failed_2of4_conversion_keeps_job(tmp_path, toy_models, one_thread, monkeypatch):
    checkpoint = _write_2of4_toy(toy_models["encoder"], tmp_path / "bert-2of4")
    # Pretend the host meets the conditions: the conversion then runs on the CPU, which torch rejects.
    monkeypatch.setattr(latency, "semi_structured_problems", lambda device, dtype: [])

    result = measure_latency(checkpoint, toy_models["encoder"], **TINY | {"repeats": 2}, method="magnitude-2of4")

    semi_structured = result["semi_structured"]
    assert semi_structured["available"] is False
    assert "the conversion rejected every 2:4-sparse nn.Linear weight (12)" in semi_structured["reason"]
    assert "CUDA" in semi_structured["reason"]
    assert result["pruned"]["linear_zero_fraction"] > 0.4
    assert result["dense"]["linear_zero_fraction"] == 0.0
    assert len(result["pruned"]["times_ms"]) == 2


def test_2of4_timing_with_stub_conversion(tmp_path, toy_models, one_thread, monkeypatch):
    checkpoint = _write_2of4_toy(toy_models["encoder"], tmp_path / "bert-2of4")
    # A stand-in for the CUDA-only conversion: it keeps the dense values, so the CPU can run the
    # model and the bookkeeping of a successful 2:4 timing is exercised.
    monkeypatch.setattr(latency, "semi_structured_problems", lambda device, dtype: [])
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda weight: weight.clone())

    result = measure_latency(checkpoint, toy_models["encoder"], **TINY | {"repeats": 3}, method="magnitude-2of4")

    semi_structured = result["semi_structured"]
    assert semi_structured["available"] is True
    assert semi_structured["converted_layers"] == 12
    assert semi_structured["rejected_layers"] == 0
    assert len(semi_structured["times_ms"]) == 3
    assert semi_structured["speedup"] == pytest.approx(result["dense"]["median_ms"] / semi_structured["median_ms"])
    assert semi_structured["speedup_over_pruned"] == pytest.approx(
        result["pruned"]["median_ms"] / semi_structured["median_ms"]
    )
    assert semi_structured["tokens_per_s"] > 0


def test_2of4_forward_failure_keeps_job(tmp_path, toy_models, one_thread, monkeypatch):
    checkpoint = _write_2of4_toy(toy_models["encoder"], tmp_path / "bert-2of4")
    # A conversion whose weights have the wrong shape, so the first forward pass raises.
    monkeypatch.setattr(latency, "semi_structured_problems", lambda device, dtype: [])
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda weight: weight[:, :4].clone())

    result = measure_latency(checkpoint, toy_models["encoder"], **TINY | {"repeats": 2}, method="magnitude-2of4")

    semi_structured = result["semi_structured"]
    assert semi_structured["available"] is False
    assert semi_structured["reason"].startswith("forward pass with 2:4 sparse weights failed: ")
    assert len(result["pruned"]["times_ms"]) == 2


def test_seq_length_over_positions_raises(toy_models):
    folder = toy_models["decoder"]

    with pytest.raises(LatencySettingsError) as error:
        measure_latency(folder, folder, **TINY | {"seq_length": 300})

    message = str(error.value)
    assert "seq_length 300" in message
    assert "256 positions" in message
    assert "n_positions = 256" in message
    assert "Set latency: seq_length to 256 or less" in message


@pytest.mark.parametrize(
    ("setting", "value"), [("batch_size", 0), ("repeats", 0), ("warmup", -1), ("seq_length", 1.5)]
)
def test_invalid_settings_raise(toy_models, setting, value):
    folder = toy_models["encoder"]

    with pytest.raises(LatencySettingsError, match=f"invalid latency {setting}"):
        measure_latency(folder, folder, **TINY | {setting: value})


def test_invalid_dtype_raises(toy_models):
    folder = toy_models["encoder"]

    with pytest.raises(LatencySettingsError, match="invalid latency dtype 'float64'"):
        measure_latency(folder, folder, **TINY | {"dtype": "float64"})


def test_minilm_against_itself(minilm_folder, one_thread):
    result = measure_latency(
        minilm_folder, minilm_folder, batch_size=1, seq_length=32, warmup=1, repeats=2, device="cpu", dtype="auto"
    )

    assert result["dense"]["parameters"] == 22_713_216
    assert result["dense"]["architecture"] == result["pruned"]["architecture"]
    assert result["untrained"] is False
    assert result["pruned"]["median_ms"] > 0
    assert math.isfinite(result["speedup"])


def test_table_parses_missing_sparsity_from_label():
    timing = {"median_ms": 2.0, "tokens_per_s": 100.0, "parameters": 10}
    record = {
        "model": "m", "method": "magnitude", "sparsity": None, "sparsity_label": "s87.5",
        "dense": timing, "pruned": timing | {"median_ms": 4.0}, "speedup": 0.5,
        "semi_structured": {"applicable": False}, "device": "cpu", "dtype": "float32",
        "batch_size": 1, "seq_length": 8,
    }

    table = latency_table([record])

    assert list(table.columns) == list(LATENCY_COLUMNS)
    assert table.loc[0, "sparsity"] == 0.875
    assert table.loc[0, "latency_ms"] == 4.0
    assert table.loc[0, "dense_latency_ms"] == 2.0
    assert table.loc[0, "untrained"] == False  # noqa: E712 (numpy bool)
    assert pandas.isna(table.loc[0, "semi_structured_available"])


# --- the workflow stage ------------------------------------------------------------------------


def write_config(folder: Path, model_folder: Path, latency_settings: dict, sparsities: list[float]) -> Path:
    """Write a config that runs a toy BERT with only the latency stage's extra work turned on."""
    path = folder / "test-config.yaml"
    settings = {
        "models": [{"name": "tiny-bert", "family": "encoder", "source": {"path": str(model_folder)}}],
        "methods": ["magnitude"],
        "sparsities": sparsities,
        "tasks": [],
        "fidelity": {"enabled": False},
        "latency": {"enabled": True, **latency_settings},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


LATENCY_TARGETS = (
    "results/tables/latency.csv",
    "results/figures/latency_speedup.png",
    "results/figures/latency_ms.png",
)


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory, toy_models) -> Path:
    """Run the latency targets on a toy BERT at sparsities 0 and 0.5 and return the folder."""
    workdir = tmp_path_factory.mktemp("latency-run")
    config = write_config(
        workdir,
        toy_models["encoder"],
        {"batch_size": 2, "seq_length": 16, "warmup": 1, "repeats": 3, "device": "cpu"},
        [0.0, 0.5],
    )
    # Targets go before --configfile, which takes every argument after it as a file.
    run_snakemake(workdir, *LATENCY_TARGETS, "--configfile", str(config))
    return workdir


def test_workflow_writes_latency_outputs(latency_run):
    for label, sparsity in (("s0", 0.0), ("s50", 0.5)):
        record = json.loads((latency_run / f"results/latency/tiny-bert/magnitude/{label}.json").read_text())
        assert record["model"] == "tiny-bert"
        assert record["method"] == "magnitude"
        assert record["sparsity"] == sparsity
        assert record["sparsity_label"] == label
        assert record["untrained"] is True
        assert record["settings"]["repeats"] == 3
        assert len(record["pruned"]["times_ms"]) == 3
        assert record["source"]["kind"] == "path"
        assert record["environment"]["versions"]["torch"] == torch.__version__
        assert record["semi_structured"] == {"applicable": False}
        assert record["threads"] == 2
        assert (latency_run / f"logs/measure_latency/tiny-bert/magnitude/{label}.benchmark.tsv").is_file()

    dense = json.loads((latency_run / "results/latency/tiny-bert/magnitude/s0.json").read_text())
    pruned = json.loads((latency_run / "results/latency/tiny-bert/magnitude/s50.json").read_text())
    assert dense["pruned"]["linear_zero_fraction"] == 0.0
    assert pruned["pruned"]["linear_zero_fraction"] > 0.2
    assert pruned["dense"]["linear_zero_fraction"] == 0.0

    log = (latency_run / "logs/measure_latency/tiny-bert/magnitude/s50.log").read_text()
    assert "UNTRAINED" in log
    assert "measured tiny-bert magnitude s50 on cpu: " in log
    assert "2:4 sparse kernels: not applicable to method magnitude" in log

    for name in ("latency_speedup", "latency_ms"):
        image = imread(latency_run / f"results/figures/{name}.png")
        assert image.shape[0] > 100
        assert (latency_run / f"logs/plot_latency/{name}.log").is_file()


def test_workflow_table_matches_json(latency_run):
    table = pandas.read_csv(latency_run / "results/tables/latency.csv")

    assert list(table.columns) == list(LATENCY_COLUMNS)
    assert list(table["sparsity"]) == [0.0, 0.5]
    for row in table.itertuples():
        label = f"s{row.sparsity * 100:g}"
        record = json.loads((latency_run / f"results/latency/tiny-bert/magnitude/{label}.json").read_text())
        assert row.model == "tiny-bert"
        assert row.method == "magnitude"
        assert row.latency_ms == pytest.approx(record["pruned"]["median_ms"])
        assert row.dense_latency_ms == pytest.approx(record["dense"]["median_ms"])
        assert row.speedup == pytest.approx(record["speedup"])
        assert row.speedup == pytest.approx(row.dense_latency_ms / row.latency_ms)
        assert row.tokens_per_s == pytest.approx(record["pruned"]["tokens_per_s"])
        assert row.dense_tokens_per_s == pytest.approx(record["dense"]["tokens_per_s"])
        assert row.parameters == record["pruned"]["parameters"]
        assert row.dense_parameters == record["dense"]["parameters"]
        assert pandas.isna(row.semi_structured_available)
        assert pandas.isna(row.semi_structured_speedup)
        assert row.device == "cpu"
        assert row.dtype == "float32"
        assert row.batch_size == 2
        assert row.seq_length == 16
        assert row.untrained


def test_workflow_rejects_long_seq_length(tmp_path, toy_models):
    config = write_config(tmp_path, toy_models["encoder"], {"seq_length": 300, "repeats": 1, "device": "cpu"}, [0.5])
    target = "results/latency/tiny-bert/magnitude/s50.json"

    result = run_snakemake(tmp_path, target, "--configfile", str(config), check=False)

    assert result.returncode != 0
    assert "Error in rule measure_latency" in result.stdout + result.stderr
    log = (tmp_path / "logs/measure_latency/tiny-bert/magnitude/s50.log").read_text()
    assert "latency seq_length 300 is longer than the 256 positions" in log
    assert "Set latency: seq_length to 256 or less in the config" in log
    assert not (tmp_path / target).exists()
    folder = tmp_path / "results/latency/tiny-bert/magnitude"
    assert not folder.exists() or list(folder.iterdir()) == []
