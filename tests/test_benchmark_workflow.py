"""End-to-end fine-tuning benchmarks through snakemake on the real MiniLM and the shared data."""

from __future__ import annotations

import json
import math
import os

import pandas
import pytest
from matplotlib.image import imread

from conftest import DATA, run_snakemake
from test_workflow import write_config

# Tiny sample counts: the test checks the plumbing and the numbers' sanity, not their quality.
TINY_FINETUNE = {
    "clm": {"block_size": 64, "train_blocks": 8, "eval_blocks": 8, "batch_size": 4},
    "qnli": {"train_samples": 16, "eval_samples": 16, "max_length": 64, "batch_size": 8},
}
FIGURES = ("clm_eval_loss", "clm_perplexity", "clm_train_runtime", "qnli_accuracy", "qnli_train_runtime")

needs_data = pytest.mark.skipif(not (DATA / "qnli" / "dev.tsv").is_file(), reason=f"shared data not found in {DATA}")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench-run")
    config = write_config(
        workdir, sparsities=[0.0, 0.5], tasks=["clm", "qnli"], finetune=TINY_FINETUNE,
        data={"local_dir": str(DATA)},
    )
    run_snakemake(workdir, "--configfile", str(config))
    return workdir


@needs_data
@pytest.mark.slow
def test_bench_json_numbers(bench_run):
    for sparsity in ("s0", "s50"):
        clm = json.loads((bench_run / f"results/bench/clm/minilm/magnitude/{sparsity}.json").read_text())
        assert math.isfinite(clm["eval_loss"])
        assert clm["perplexity"] == pytest.approx(math.exp(clm["eval_loss"]))
        assert clm["block_size"] == 64
        assert clm["eval"]["eval_tokens"] == 8 * 63
        assert clm["zero_shot"]["applicable"] is False
        assert clm["dataset"]["eval"]["sha256"] == "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"
        assert clm["train_runtime_s"] > 0
        assert clm["masks_kept"] is True
        assert clm["sparsity_after"] == clm["sparsity_before"]

        qnli = json.loads((bench_run / f"results/bench/qnli/minilm/magnitude/{sparsity}.json").read_text())
        assert 0.0 <= qnli["accuracy"] <= 1.0
        assert qnli["eval_samples"] == 16
        assert qnli["train_samples"] == 16
        assert qnli["dataset"]["train"]["sha256"] == "763e95932dd3578251de71582e06829015f9c3815a518c751dc537219b159de4"
        assert qnli["sparsity_after"] == qnli["sparsity_before"]
        assert qnli["seed"] == 0
        assert qnli["device"] == "cpu"

    sparse = json.loads((bench_run / "results/bench/qnli/minilm/magnitude/s50.json").read_text())
    assert sparse["sparsity_before"] == pytest.approx(0.5, abs=0.01)


@needs_data
@pytest.mark.slow
def test_bench_table_and_figures(bench_run):
    table = pandas.read_csv(bench_run / "results/tables/bench.csv")
    assert len(table) == 4
    assert set(table["task"]) == {"clm", "qnli"}
    for name in FIGURES:
        assert imread(bench_run / f"results/figures/{name}.png").shape[0] > 100
    log = (bench_run / "logs/finetune_eval/qnli/minilm/magnitude/s50.log").read_text()
    assert "epoch 1/" in log


@needs_data
@pytest.mark.slow
def test_bench_report_builds(bench_run):
    report = bench_run / "report.html"
    run_snakemake(bench_run, "--report", str(report), "--configfile", str(bench_run / "test-config.yaml"))
    assert report.stat().st_size > 10_000


def test_missing_data_dir_rejected(tmp_path):
    config = write_config(tmp_path, sparsities=[0.5], tasks=["qnli"], data={"local_dir": str(tmp_path / "nowhere")})

    result = run_snakemake(tmp_path, "--configfile", str(config), check=False)

    assert result.returncode != 0
    assert f"'{tmp_path / 'nowhere' / 'qnli' / 'dev.tsv'}' not found" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@needs_data
def test_block_size_too_large_fails_cleanly(tmp_path, toy_models):
    config = write_config(
        tmp_path,
        models=[{"name": "tiny-gpt2", "family": "decoder", "source": {"path": str(toy_models["decoder"])}}],
        sparsities=[0.5], tasks=["clm"], finetune={"clm": {"block_size": 4096}},
        data={"local_dir": str(DATA)},
    )

    result = run_snakemake(tmp_path, "--configfile", str(config), check=False)

    assert result.returncode != 0
    log = (tmp_path / "logs/finetune_eval/clm/tiny-gpt2/magnitude/s50.log").read_text()
    assert "4096" in log
    assert not (tmp_path / "results/bench/clm/tiny-gpt2/magnitude/s50.json").exists()


@needs_data
def test_untrained_models_benchmark(tmp_path, toy_models):
    config = write_config(
        tmp_path,
        models=[
            {"name": "tiny-gpt2", "family": "decoder", "source": {"path": str(toy_models["decoder"])}},
            {"name": "tiny-bart", "family": "encoder-decoder", "source": {"path": str(toy_models["encoder-decoder"])}},
        ],
        sparsities=[0.5], tasks=["clm", "qnli"], finetune=TINY_FINETUNE,
    )

    run_snakemake(tmp_path, "--configfile", str(config), env={"LMPRUNE_DATA_DIR": str(DATA)})

    for name in ("tiny-gpt2", "tiny-bart"):
        clm = json.loads((tmp_path / f"results/bench/clm/{name}/magnitude/s50.json").read_text())
        assert clm["untrained"] is True
        assert clm["zero_shot"]["applicable"] is True
        assert math.isfinite(clm["zero_shot"]["perplexity"])
        assert clm["sparsity_after"] == clm["sparsity_before"]
        assert clm["world_size"] == 1
        assert clm["backend"] is None
        qnli = json.loads((tmp_path / f"results/bench/qnli/{name}/magnitude/s50.json").read_text())
        assert qnli["sparsity_after"] == qnli["sparsity_before"]
