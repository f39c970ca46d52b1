"""End-to-end runs of the real Snakefile: the real MiniLM, untrained GPT-2 and BART, failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas
import pytest
import torch
import yaml
from matplotlib.image import imread

from conftest import run_snakemake
from lmprune.models import load_model
from lmprune.pruning import prunable_weights

# Fast codec levels: the test checks that the numbers are consistent, not the best ratios.
FAST_CODECS = {"gzip": 1, "bz2": 1, "xz": 0, "zstd": 1}


def write_config(folder: Path, **settings) -> Path:
    """Write a config that overrides config/config.yaml; benchmarks, fidelity and latency are off unless given."""
    path = folder / "test-config.yaml"
    defaults = {
        "sizes": {"codecs": FAST_CODECS},
        "tasks": [],
        "fidelity": {"enabled": False},
        "latency": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(defaults | settings))
    return path


def planned_jobs(result) -> dict[str, int]:
    """Parse the 'Job stats' table of a snakemake dry run into {rule: count}."""
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    """Run the main job on the real MiniLM at sparsities 0 and 0.5 and return its folder."""
    workdir = tmp_path_factory.mktemp("minilm-run")
    config = write_config(workdir, sparsities=[0.0, 0.5])
    run_snakemake(workdir, "--configfile", str(config))
    return workdir


@pytest.mark.slow
def test_minilm_outputs_exist(minilm_run):
    for sparsity in ("s0", "s50"):
        checkpoint = minilm_run / "results/checkpoints/minilm/magnitude" / sparsity
        assert (checkpoint / "model.safetensors").is_file()
        assert (checkpoint / "tokenizer.json").is_file()
        assert (checkpoint / "pruning.json").is_file()
        assert (minilm_run / f"results/sizes/minilm/magnitude/{sparsity}.json").is_file()
        for suffix in ("-all.png", "-layers.png"):
            image = imread(minilm_run / f"results/histograms/minilm/magnitude/{sparsity}{suffix}")
            assert image.shape[0] > 100
        assert (minilm_run / f"logs/prune/minilm/magnitude/{sparsity}.log").is_file()
    assert imread(minilm_run / "results/figures/size_vs_sparsity.png").shape[1] > 100


@pytest.mark.slow
def test_minilm_pruning_record(minilm_run):
    record = json.loads((minilm_run / "results/checkpoints/minilm/magnitude/s50/pruning.json").read_text())

    assert record["model"] == "minilm"
    assert record["untrained"] is False
    assert record["source"]["kind"] == "package"
    assert len(record["source"]["weights_sha256"]) == 64
    assert record["num_parameters"] == 22_713_216
    assert record["num_pruned"] == round(0.5 * record["num_weights"])
    assert record["sparsity_achieved"] == pytest.approx(0.5, abs=1e-6)
    assert record["threshold"] > 0
    assert sum(tensor["zeros"] for tensor in record["tensors"]) == record["num_pruned"]

    dense = json.loads((minilm_run / "results/checkpoints/minilm/magnitude/s0/pruning.json").read_text())
    assert dense["num_pruned"] == 0
    assert dense["num_weights"] == record["num_weights"]


@pytest.mark.slow
def test_minilm_checkpoint_loads_sparse(minilm_run):
    from transformers import AutoModel

    folder = minilm_run / "results/checkpoints/minilm/magnitude/s50"
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)

    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    record = json.loads((folder / "pruning.json").read_text())
    zeros = sum(int((weight == 0).sum()) for _, weight in prunable_weights(model))
    assert zeros == record["num_pruned"]
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in model.named_parameters())


@pytest.mark.slow
def test_minilm_sizes_shrink_compressed(minilm_run):
    dense = json.loads((minilm_run / "results/sizes/minilm/magnitude/s0.json").read_text())
    sparse = json.loads((minilm_run / "results/sizes/minilm/magnitude/s50.json").read_text())

    # Zeros do not shrink the dense safetensors file...
    assert abs(sparse["weights_bytes"] - dense["weights_bytes"]) < 1024
    # ...but they compress: every codec writes far less at 50% sparsity than at 0%.
    for codec, level in FAST_CODECS.items():
        assert sparse["codecs"][codec]["level"] == level
        assert sparse["codecs"][codec]["compressed_bytes"] < 0.75 * dense["codecs"][codec]["compressed_bytes"]
        assert sparse["codecs"][codec]["throughput_mib_s"] > 0

    table = pandas.read_csv(minilm_run / "results/tables/sizes.csv")
    assert len(table) == 2 * (len(FAST_CODECS) + 1)
    assert set(table["codec"]) == {"raw", *FAST_CODECS}


@pytest.mark.slow
def test_rebuild_one_figure(minilm_run):
    figure = minilm_run / "results/histograms/minilm/magnitude/s50-all.png"
    checkpoint_time = (minilm_run / "results/checkpoints/minilm/magnitude/s50/model.safetensors").stat().st_mtime
    figure.unlink()
    config = minilm_run / "test-config.yaml"

    # Targets go before --configfile, which takes every argument after it as a file.
    plan = run_snakemake(minilm_run, str(figure.relative_to(minilm_run)), "--dry-run", "--configfile", str(config))
    assert planned_jobs(plan) == {"plot_histograms": 1}

    run_snakemake(minilm_run, str(figure.relative_to(minilm_run)), "--configfile", str(config))
    assert figure.is_file()
    assert (minilm_run / "results/checkpoints/minilm/magnitude/s50/model.safetensors").stat().st_mtime == checkpoint_time


@pytest.mark.slow
def test_rerun_has_nothing_to_do(minilm_run):
    result = run_snakemake(minilm_run, "--configfile", str(minilm_run / "test-config.yaml"), "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_untrained_gpt2_and_bart_run(tmp_path, toy_models):
    config = write_config(
        tmp_path,
        models=[
            {"name": "tiny-gpt2", "family": "decoder", "source": {"path": str(toy_models["decoder"])}},
            {"name": "tiny-bart", "family": "encoder-decoder", "source": {"path": str(toy_models["encoder-decoder"])}},
        ],
        sparsities=[0.7],
        keep_checkpoints=False,
    )

    run_snakemake(tmp_path, "--configfile", str(config))

    for name in ("tiny-gpt2", "tiny-bart"):
        sizes = json.loads((tmp_path / f"results/sizes/{name}/magnitude/s70.json").read_text())
        assert sizes["untrained"] is True
        assert sizes["sparsity_achieved"] == pytest.approx(0.7, abs=1e-5)
        assert (tmp_path / f"results/histograms/{name}/magnitude/s70-layers.png").is_file()
        # keep_checkpoints: false marks checkpoints temporary, so they are gone after the run.
        assert not (tmp_path / f"results/checkpoints/{name}/magnitude/s70").exists()
    log = (tmp_path / "logs/prune/tiny-gpt2/magnitude/s70.log").read_text()
    assert "UNTRAINED" in log


def test_checkpoint_keeps_gpt2_tied_and_conv1d_pruned(tmp_path, toy_models):
    config = write_config(
        tmp_path,
        models=[{"name": "tiny-gpt2", "family": "decoder", "source": {"path": str(toy_models["decoder"])}}],
        sparsities=[0.5],
    )

    run_snakemake(tmp_path, "results/checkpoints/tiny-gpt2/magnitude/s50", "--configfile", str(config))

    model = load_model(tmp_path / "results/checkpoints/tiny-gpt2/magnitude/s50")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.lmprune_untrained is True
    for block in model.transformer.h:
        assert int((block.attn.c_attn.weight == 0).sum()) > 0
        assert int((block.mlp.c_fc.weight == 0).sum()) > 0
        assert not torch.any(block.ln_1.weight == 0)


def test_failed_prune_leaves_no_output(tmp_path, toy_models):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for path in toy_models["encoder"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = write_config(
        tmp_path,
        models=[{"name": "broken", "family": "encoder", "source": {"path": str(broken)}}],
        sparsities=[0.5],
    )

    result = run_snakemake(tmp_path, "--configfile", str(config), check=False)

    assert result.returncode != 0
    assert "Error in rule prune" in result.stdout + result.stderr
    checkpoints = tmp_path / "results/checkpoints/broken/magnitude"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []
    assert not (tmp_path / "results/sizes").exists()
