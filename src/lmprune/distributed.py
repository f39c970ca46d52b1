"""Multi-process (DDP) fine-tuning: the process count, the worker launch and each rank's view.

A fine-tune job that runs more than one process launches them with ``torch.distributed.run``
(torchrun) on this host only. Each worker runs :mod:`lmprune.finetune_worker`, joins the process
group, and trains its shard of the data with the model wrapped in ``DistributedDataParallel``.
docs/distributed.md describes the choices for users.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "CPU_PROCESSES_ENV",
    "DistributedContext",
    "init_worker",
    "launch_workers",
    "process_count",
]

log = logging.getLogger(__name__)

# Processes a fine-tune job on the CPU runs (default 1). The test suite sets it to train with two
# gloo processes, and CPU-only hosts can use it too. It is an environment variable, not a config
# key, because config.yaml contains experiment settings only.
CPU_PROCESSES_ENV = "LMPRUNE_CPU_PROCESSES"


def process_count(device: torch.device, gpus: int) -> int:
    """Return how many processes a fine-tune job on ``device`` runs.

    - CUDA: ``gpus``, the GPUs the job was given (the rule's ``gpu`` resource), capped by
      ``torch.cuda.device_count()``, and at least 1. A device with an index (``cuda:1``) means
      one process on that GPU.
    - CPU: the integer in ``LMPRUNE_CPU_PROCESSES``, or 1 when it is unset or empty.

    Raises:
        ValueError: if ``gpus`` is not an integer of at least 0, or LMPRUNE_CPU_PROCESSES is set
            to anything but a positive integer.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, numbers.Integral) or gpus < 0:
        raise ValueError(f"the gpu resource must be an integer of at least 0, got {gpus!r}")

    if device.type == "cuda":
        if device.index is not None:
            return 1
        visible = torch.cuda.device_count()
        if gpus > visible:
            log.warning(
                "the job was given %d GPUs but only %d are visible (CUDA_VISIBLE_DEVICES=%s), so it runs %d processes",
                gpus, visible, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), visible,
            )
        return max(1, min(gpus, visible))

    value = os.environ.get(CPU_PROCESSES_ENV, "").strip()
    if not value:
        return 1
    try:
        processes = int(value)
    except ValueError:
        processes = 0
    if processes < 1:
        raise ValueError(f"{CPU_PROCESSES_ENV} must be a positive integer, got {value!r}. Unset it to run one process.")
    return processes


@dataclass(frozen=True)
class DistributedContext:
    """One process's place in the process group of a DDP run."""

    rank: int  # 0 .. world_size - 1, across the whole job
    local_rank: int  # index of the process on this host, which is also its CUDA device index
    world_size: int
    backend: str  # "nccl" on CUDA, "gloo" on the CPU

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that evaluates and writes the results."""
        return self.rank == 0

    @classmethod
    def from_process_group(cls) -> "DistributedContext":
        """Describe this process in the default process group, which must be initialised.

        ``local_rank`` comes from the ``LOCAL_RANK`` variable that torchrun sets, or equals
        the rank when that is unset (a single-host group started another way).
        """
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return cls(rank=rank, local_rank=local_rank, world_size=dist.get_world_size(), backend=dist.get_backend())

    def local_batch_size(self, batch_size: int) -> int:
        """Split a global batch of ``batch_size`` samples evenly over the ranks.

        Raises:
            ValueError: if ``batch_size`` is not a multiple of the world size. An uneven split
                would weigh the samples of the smaller batches more when DDP averages the
                gradients of the ranks.
        """
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size {batch_size} cannot be split evenly over {self.world_size} processes. "
                f"Use a multiple of {self.world_size}, or give the job a number of GPUs (or "
                f"{CPU_PROCESSES_ENV}) that divides the batch size."
            )
        return batch_size // self.world_size


def init_worker(device_type: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group that torchrun describes in the environment of this process.

    torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``, which ``init_process_group``'s default ``env://`` method reads.

    Args:
        device_type: "cuda" runs rank ``LOCAL_RANK`` on ``cuda:LOCAL_RANK`` with the nccl
            backend. "cpu" runs on the CPU with gloo.

    Returns:
        This process's context and the device it trains on.
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be cuda or cpu, got {device_type!r}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        # NOTE: the test suite runs gloo on the CPU only, so this nccl branch and DDP on CUDA
        # devices have not run under a test.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend)
    return DistributedContext.from_process_group(), device


def launch_workers(job: dict, processes: int, threads: int) -> None:
    """Run ``processes`` workers of :mod:`lmprune.finetune_worker` on ``job`` and wait for them.

    The job goes to the workers as a JSON file in a temporary folder, deleted afterwards.
    torchrun's ``--standalone`` rendezvous keeps every process on this host, and
    ``--local-addr 127.0.0.1`` makes the workers meet on the loopback address. Each worker
    gets ``threads // processes`` torch threads (at least 1).

    Args:
        job: the arguments of :func:`lmprune.benchmark.run_job`, which must be JSON-serialisable.
            Its ``output`` file is deleted if the workers fail, because rank 0 may have
            written it before another rank failed.
        processes: workers to start, at least 2.
        threads: CPU threads of the whole job.

    Raises:
        RuntimeError: if torchrun exits with a non-zero code, which it does when any worker fails.
    """
    if processes < 2:
        raise ValueError(f"launch_workers needs at least 2 processes, got {processes}")
    worker_threads = max(1, threads // processes)
    with tempfile.TemporaryDirectory(prefix="lmprune-ddp-") as folder:
        job_file = Path(folder) / "job.json"
        job_file.write_text(json.dumps({**job, "threads": worker_threads}))
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", "--local-addr", "127.0.0.1",
            "--nproc-per-node", str(processes),
            "-m", "lmprune.finetune_worker", str(job_file),
        ]
        # torchrun sets OMP_NUM_THREADS to 1 (with a warning) for workers that inherit no value.
        environment = {**os.environ, "OMP_NUM_THREADS": str(worker_threads)}
        log.info("launching %d worker processes, %d thread(s) each: %s", processes, worker_threads, shlex.join(command))
        result = subprocess.run(command, env=environment, check=False)

    if result.returncode != 0:
        Path(job["output"]).unlink(missing_ok=True)
        raise RuntimeError(
            f"the {processes} fine-tuning worker processes failed: torchrun exited with code "
            f"{result.returncode}. The log lines marked with a rank show the error."
        )
    log.info("all %d worker processes finished", processes)
