"""End-to-end runs of the pruning methods through the real Snakefile, on toy models and shared data."""

import json
import os
import stat

import pytest

from conftest import DATA, run_snakemake
from lmprune.models import load_model
from test_workflow import planned_jobs, write_config

LOCAL_DATA = {"LMPRUNE_DATA_DIR": str(DATA)}
SMALL_CALIBRATION = {"calibration": {"samples": 8, "seq_length": 32, "batch_size": 4}}


def toy_config(folder, toy_models, **settings):
    return write_config(
        folder,
        models=[{"name": "tiny-bert", "family": "encoder", "source": {"path": str(toy_models["encoder"])}}],
        pruning=SMALL_CALIBRATION,
        **settings,
    )


def test_dry_run_plans_dense_once(tmp_path, toy_models):
    config = toy_config(
        tmp_path, toy_models, methods=["magnitude", "wanda", "sparsegpt-2of4"], sparsities=[0.0, 0.3, 0.7]
    )

    plan = run_snakemake(tmp_path, "--dry-run", "--configfile", str(config), env=LOCAL_DATA)

    # magnitude s0, s30, s70; wanda s30, s70; sparsegpt-2of4 s50.
    assert planned_jobs(plan)["prune"] == 6
    assert "results/checkpoints/tiny-bert/sparsegpt-2of4/s50" in plan.stdout
    assert "results/checkpoints/tiny-bert/wanda/s0" not in plan.stdout


def test_methods_run_end_to_end(tmp_path, toy_models):
    config = toy_config(
        tmp_path, toy_models, methods=["magnitude", "wanda", "sparsegpt-2of4", "structured-ffn"], sparsities=[0.0, 0.5]
    )

    run_snakemake(tmp_path, "--configfile", str(config), env=LOCAL_DATA)

    checkpoints = tmp_path / "results/checkpoints/tiny-bert"
    wanda = json.loads((checkpoints / "wanda/s50/pruning.json").read_text())
    assert wanda["scope"] == "layers"
    assert wanda["sparsity_achieved"] == pytest.approx(0.5, abs=1e-6)
    assert wanda["calibration"]["samples"] == 8
    assert wanda["calibration"]["text"]["path"].endswith("wikitext-2/valid.txt")
    assert "calibrating tiny-bert on 8 windows of 32 tokens" in (tmp_path / "logs/prune/tiny-bert/wanda/s50.log").read_text()

    two_of_four = load_model(checkpoints / "sparsegpt-2of4/s50")
    for layer in two_of_four.bert.encoder.layer:
        weight = layer.intermediate.dense.weight
        assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1) <= 2).all()

    dense_width = load_model(checkpoints / "magnitude/s0").config.intermediate_size
    smaller = load_model(checkpoints / "structured-ffn/s50")
    assert smaller.config.intermediate_size == dense_width // 2
    assert smaller.bert.encoder.layer[0].intermediate.dense.weight.shape[0] == dense_width // 2

    table = (tmp_path / "results/tables/sizes.csv").read_text()
    assert "structured-ffn" in table
    assert "sparsegpt-2of4" in table

    umask = os.umask(0)
    os.umask(umask)
    weights_mode = stat.S_IMODE((checkpoints / "wanda/s50/model.safetensors").stat().st_mode)
    assert weights_mode == 0o666 & ~umask

    # Calibration settings reach only the methods that read them: changing them re-runs wanda,
    # sparsegpt-2of4 and structured-ffn but leaves the magnitude checkpoints alone.
    changed = toy_config(
        tmp_path, toy_models, methods=["magnitude", "wanda", "sparsegpt-2of4", "structured-ffn"], sparsities=[0.0, 0.5],
    )
    changed.write_text(changed.read_text().replace("samples: 8", "samples: 6"))
    plan = run_snakemake(tmp_path, "--dry-run", "--configfile", str(changed), env=LOCAL_DATA)
    assert planned_jobs(plan)["prune"] == 3
    assert "output: results/checkpoints/tiny-bert/magnitude/" not in plan.stdout


def test_n_m_wrong_sparsity_fails(tmp_path, toy_models):
    config = toy_config(tmp_path, toy_models, methods=["magnitude-2of4"], sparsities=[0.5])

    result = run_snakemake(
        tmp_path, "results/checkpoints/tiny-bert/magnitude-2of4/s70", "--configfile", str(config), check=False
    )

    assert result.returncode != 0
    assert "magnitude-2of4 keeps 2 of every 4" in (tmp_path / "logs/prune/tiny-bert/magnitude-2of4/s70.log").read_text()
    assert not (tmp_path / "results/checkpoints/tiny-bert/magnitude-2of4/s70").exists()


def test_calibration_with_too_few_windows_names_the_setting(tmp_path, toy_models):
    config = write_config(
        tmp_path,
        models=[{"name": "tiny-bert", "family": "encoder", "source": {"path": str(toy_models["encoder"])}}],
        methods=["wanda"],
        sparsities=[0.5],
        pruning={"calibration": {"samples": 1_000_000, "seq_length": 32}},
    )

    result = run_snakemake(tmp_path, "--configfile", str(config), check=False, env=LOCAL_DATA)

    assert result.returncode != 0
    assert "pruning.calibration.samples=1000000" in (tmp_path / "logs/prune/tiny-bert/wanda/s50.log").read_text()
    assert not (tmp_path / "results/checkpoints/tiny-bert/wanda/s50").exists()


def test_calibration_missing_data_fails(tmp_path, toy_models):
    config = toy_config(tmp_path, toy_models, methods=["wanda"], sparsities=[0.5])

    result = run_snakemake(
        tmp_path, "--dry-run", "--configfile", str(config), check=False, env={"LMPRUNE_DATA_DIR": str(tmp_path / "nowhere")}
    )

    assert result.returncode != 0
    assert "nowhere" in result.stdout + result.stderr
