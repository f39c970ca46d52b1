"""Multi-process (DDP) fine-tuning on the CPU: gloo processes on this host only.

The training tests spawn two processes that meet through a file store in a temporary folder.
The workflow tests run the finetune_eval rule with LMPRUNE_CPU_PROCESSES=2, so torchrun starts
two workers. GLOO_SOCKET_IFNAME=lo keeps gloo's connections on the loopback interface.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from conftest import DATA, run_snakemake
from lmprune.distributed import CPU_PROCESSES_ENV, DistributedContext, process_count
from lmprune.finetune import SparsityMasks, load_task_model, train
from lmprune.pruning import prune_model
from test_benchmark_workflow import TINY_FINETUNE, needs_data
from test_finetune import token_loader
from test_workflow import write_config

CPU = torch.device("cpu")
LOG = logging.getLogger("test_distributed")
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"}

WORLD_SIZE = 2
GLOBAL_BATCH = 4
NUM_SAMPLES = 8
EPOCHS = 2
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
# GPT-2 has a tied LM head. BartForCausalLM has parameters the loss never reaches (the
# decoder's cross-attention, with no encoder), which DDP rejects unless configured for them.
DDP_FAMILIES = ("decoder", "encoder-decoder")


# --- process_count and DistributedContext -----------------------------------------------------


def test_cpu_processes_default_one(monkeypatch):
    monkeypatch.delenv(CPU_PROCESSES_ENV, raising=False)
    assert process_count(CPU, 1) == 1
    monkeypatch.setenv(CPU_PROCESSES_ENV, "")
    assert process_count(CPU, 4) == 1


def test_cpu_processes_from_env(monkeypatch):
    monkeypatch.setenv(CPU_PROCESSES_ENV, "3")
    assert process_count(CPU, 1) == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_cpu_processes_rejects_bad_env(monkeypatch, value):
    monkeypatch.setenv(CPU_PROCESSES_ENV, value)
    with pytest.raises(ValueError, match=f"{CPU_PROCESSES_ENV} must be a positive integer, got '{value}'"):
        process_count(CPU, 1)


def test_cuda_processes_capped_by_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv(CPU_PROCESSES_ENV, "8")  # applies to the CPU only
    cuda = torch.device("cuda")
    assert process_count(cuda, 4) == 2
    assert process_count(cuda, 2) == 2
    assert process_count(cuda, 1) == 1
    assert process_count(cuda, 0) == 1
    assert process_count(torch.device("cuda", 1), 2) == 1


@pytest.mark.parametrize("gpus", [-1, True, 1.5, "2"])
def test_process_count_rejects_bad_gpus(gpus):
    with pytest.raises(ValueError, match="gpu resource"):
        process_count(CPU, gpus)


def test_local_batch_size_splits_evenly():
    context = DistributedContext(rank=1, local_rank=1, world_size=2, backend="gloo")
    assert context.local_batch_size(8) == 4
    assert not context.is_main
    with pytest.raises(ValueError, match="batch_size 3 cannot be split evenly over 2 processes"):
        context.local_batch_size(3)


def test_train_ddp_needs_distributed_sampler(toy_models):
    model, _ = load_task_model(toy_models["decoder"], "clm", "decoder")
    context = DistributedContext(rank=0, local_rank=0, world_size=2, backend="gloo")
    with pytest.raises(ValueError, match="DistributedSampler"):
        train(model, token_loader(model.config.vocab_size), epochs=1, learning_rate=1e-3,
              device=CPU, masks=None, log=LOG, progress=False, distributed=context)


# --- train on two gloo processes --------------------------------------------------------------


def copy_without_dropout(model_folder: Path, folder: Path) -> Path:
    """Copy a toy model into ``folder`` with every dropout probability in its config set to 0.

    Without dropout a training step depends only on its batch, so two ranks can match one process.
    """
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in config.items():
        if key.endswith(("dropout", "pdrop")) and isinstance(value, float):
            config[key] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def pruned_toy(model_folder: Path, family: str) -> tuple[nn.Module, int]:
    """Load a toy model for CLM, prune half of its weights; return it and its zero count."""
    model, _ = load_task_model(model_folder, "clm", family)
    report = prune_model(model, "magnitude", 0.5)
    return model, sum(entry["zeros"] for entry in report.tensors)


def train_rank(rank: int, model_folder: Path, family: str, folder: Path) -> None:
    """Train one rank of a two-process DDP run and save its model and numbers in ``folder``."""
    os.environ.update(LOOPBACK)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=WORLD_SIZE)
    try:
        context = DistributedContext.from_process_group()
        model, zeros_after_pruning = pruned_toy(model_folder, family)
        masks = SparsityMasks.from_model(model)
        samples = token_loader(model.config.vocab_size, num_samples=NUM_SAMPLES).dataset
        # Without shuffling, rank r takes samples r, r + 2, ..., so each step's two local batches
        # together are the batch a single process takes at that step.
        sampler = DistributedSampler(samples, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
        loader = DataLoader(samples, batch_size=context.local_batch_size(GLOBAL_BATCH), sampler=sampler)
        result = train(model, loader, epochs=EPOCHS, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                       device=CPU, masks=masks, log=LOG, progress=False, distributed=context)
        torch.save(
            {
                "result": result.to_dict(),
                "zeros_after_pruning": zeros_after_pruning,
                "zeros_after_training": masks.num_zeros(),
                "state": model.state_dict(),
            },
            folder / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=DDP_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dropout_free_model(toy_models, tmp_path_factory, family) -> Path:
    return copy_without_dropout(toy_models[family], tmp_path_factory.mktemp("no-dropout") / family)


@pytest.fixture(scope="module")
def ddp_ranks(dropout_free_model, family, tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp-train")
    mp.spawn(train_rank, args=(dropout_free_model, family, folder), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_ddp_masks_keep_zeros_each_rank(ddp_ranks):
    for rank in ddp_ranks:
        assert rank["zeros_after_pruning"] > 0
        assert rank["zeros_after_training"] == rank["zeros_after_pruning"]


def test_ddp_ranks_end_identical(ddp_ranks):
    first, second = (rank["state"] for rank in ddp_ranks)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_ddp_result_counts_all_ranks(ddp_ranks):
    for rank in ddp_ranks:
        result = rank["result"]
        assert result["world_size"] == WORLD_SIZE
        assert result["steps"] == EPOCHS * NUM_SAMPLES // GLOBAL_BATCH
        assert result["train_samples"] == EPOCHS * NUM_SAMPLES
        assert result["train_samples_per_s"] == pytest.approx(result["train_samples"] / result["train_runtime_s"])
        assert math.isfinite(result["mean_train_loss"])
    assert ddp_ranks[0]["result"]["mean_train_loss"] == ddp_ranks[1]["result"]["mean_train_loss"]


def test_ddp_matches_single_process(ddp_ranks, dropout_free_model, family):
    model, _ = pruned_toy(dropout_free_model, family)
    masks = SparsityMasks.from_model(model)
    loader = token_loader(model.config.vocab_size, num_samples=NUM_SAMPLES, batch_size=GLOBAL_BATCH)
    result = train(model, loader, epochs=EPOCHS, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                   device=CPU, masks=masks, log=LOG, progress=False)

    ddp_result = ddp_ranks[0]["result"]
    assert ddp_result["steps"] == result.steps
    assert ddp_result["train_samples"] == result.train_samples
    assert ddp_result["mean_train_loss"] == pytest.approx(result.mean_train_loss, rel=1e-5)
    assert ddp_result["final_train_loss"] == pytest.approx(result.final_train_loss, rel=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)


# --- the finetune_eval rule with two worker processes -----------------------------------------

TOY_GPT2 = "tiny-gpt2"
BENCH_JSON = f"results/bench/clm/{TOY_GPT2}/magnitude/s50.json"
BENCH_LOG = f"logs/finetune_eval/clm/{TOY_GPT2}/magnitude/s50.log"


def run_finetune_two_processes(workdir: Path, model_folder: Path, finetune: dict, check: bool = True):
    config = write_config(
        workdir,
        models=[{"name": TOY_GPT2, "family": "decoder", "source": {"path": str(model_folder)}}],
        sparsities=[0.5], tasks=["clm"], finetune=finetune, data={"local_dir": str(DATA)},
    )
    return run_snakemake(
        workdir, BENCH_JSON, "--configfile", str(config), check=check,
        env={CPU_PROCESSES_ENV: str(WORLD_SIZE), **LOOPBACK},
    )


@needs_data
def test_rule_two_processes_records_world_size(tmp_path, toy_models):
    run_finetune_two_processes(tmp_path, toy_models["decoder"], TINY_FINETUNE)

    record = json.loads((tmp_path / BENCH_JSON).read_text())
    assert record["world_size"] == WORLD_SIZE
    assert record["backend"] == "gloo"
    assert record["batch_size_per_process"] == TINY_FINETUNE["clm"]["batch_size"] // WORLD_SIZE
    assert record["train"]["world_size"] == WORLD_SIZE
    assert record["train"]["train_samples"] == TINY_FINETUNE["clm"]["train_blocks"]
    assert record["eval"]["eval_blocks"] == TINY_FINETUNE["clm"]["eval_blocks"]
    assert math.isfinite(record["perplexity"])
    assert record["sparsity_after"] == record["sparsity_before"]
    assert record["sparsity_before"] == pytest.approx(0.5, abs=0.01)

    log = (tmp_path / BENCH_LOG).read_text()
    assert "launching 2 worker processes" in log
    for rank in range(WORLD_SIZE):
        assert f"INFO rank {rank} lmprune.benchmark: epoch 1/1" in log
    assert "INFO rank 0 lmprune.benchmark: wrote" in log
    assert "INFO rank 1 lmprune.benchmark: wrote" not in log
    assert "all 2 worker processes finished" in log


@needs_data
def test_rule_worker_failure_fails_job(tmp_path, toy_models):
    odd_batch = {"clm": {**TINY_FINETUNE["clm"], "batch_size": 3}}

    result = run_finetune_two_processes(tmp_path, toy_models["decoder"], odd_batch, check=False)

    assert result.returncode != 0
    assert not (tmp_path / BENCH_JSON).exists()
    log = (tmp_path / BENCH_LOG).read_text()
    assert "ERROR rank 0 lmprune: job failed: batch_size 3 cannot be split evenly over 2 processes" in log
    assert "torchrun exited with code" in log
