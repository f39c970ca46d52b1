"""Set-up shared by the workflow's scripts: logging, threads, offline hub access, provenance."""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

_PACKAGES = ("lmprune", "torch", "transformers", "safetensors", "datasets", "snakemake", "numpy")


def start_job(
    log_path: str | None, threads: int = 1, offline: bool = True, rank: int | None = None
) -> logging.Logger:
    """Send log records to ``log_path`` (and stderr), use ``threads`` torch threads.

    With ``offline`` it sets ``HF_HUB_OFFLINE=1`` so the Hugging Face libraries do not reach the
    hub, because compute jobs read only the folders and caches that the local rules filled.

    ``rank`` is set by the worker processes of a multi-process (DDP) job. Their lines then
    read ``rank N`` after the level, and they append to ``log_path``, which the launching
    process has already truncated. Every writer opens the file in append mode, so the lines
    of all processes end up in it and none overwrites another.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        if rank is None:
            open(log_path, "w").close()
        handlers.append(logging.FileHandler(log_path, mode="a"))
    rank_field = "" if rank is None else f"rank {rank} "
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s {rank_field}%(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # An uncaught error goes into the job's log file too, not only to Snakemake's stderr.
    def log_uncaught(error_type, error, traceback):
        logging.getLogger("lmprune").error("job failed: %s", error, exc_info=(error_type, error, traceback))

    sys.excepthook = log_uncaught
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(max(1, int(threads)))
    return logging.getLogger("lmprune")


def environment(device: str = "cpu") -> dict:
    """Return the host, ``device`` and library versions a result was produced with."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "versions": versions,
    }


def checkpoint_fields(checkpoint, pruning: dict) -> dict:
    """Return the fields that start every per-checkpoint result JSON, taken from its ``pruning.json``."""
    return {
        "model": pruning["model"],
        "method": pruning["method"],
        "sparsity": pruning["sparsity_target"],
        "sparsity_achieved": pruning["sparsity_achieved"],
        "untrained": pruning["untrained"],
        "checkpoint": str(checkpoint),
    }
