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


def start_job(log_path: str | None, threads: int = 1, offline: bool = True) -> logging.Logger:
    """Send log records to ``log_path`` (and stderr), use ``threads`` torch threads.

    With ``offline`` the Hugging Face libraries are told not to reach the hub
    (``HF_HUB_OFFLINE=1``), because compute jobs read only the folders ``resolve_model`` wrote.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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


def environment() -> dict:
    """Return the host, device and library versions a result was produced with."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "versions": versions,
    }
