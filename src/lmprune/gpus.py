"""Pin each Snakemake job of a packed scheduler job to its own GPUs.

With Snakemake job groups (profiles/pbs/config.yaml, "GPU packing") one PBS or Slurm job runs up
to four fine-tunes at once on one node, and every process would see all of the node's GPUs.
:func:`claim_gpu` gives each process its own: it takes an exclusive lock on one lock file per
GPU, in a node-local folder named after the scheduler job, and sets CUDA_VISIBLE_DEVICES to the
GPUs it locked. The locks last until the process exits, so the next fine-tune of the group job
gets a GPU that is free again.

The node's GPUs come from the first of these that is available:

1. LMPRUNE_NODE_GPUS, an integer count, for tests and for sites where detection fails;
2. CUDA_VISIBLE_DEVICES, when the scheduler set it;
3. ``nvidia-smi -L``;
4. ``torch.cuda.device_count()`` in a child process, where GPU device files exist. The child
   process leaves CUDA in this process uninitialised.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

NODE_GPUS_ENV = "LMPRUNE_NODE_GPUS"
LOCK_DIR_ENV = "LMPRUNE_GPU_LOCK_DIR"
# Job id variables of the schedulers, in the order they are checked.
JOB_ID_ENVS = ("PBS_JOBID", "SLURM_JOB_ID")

# File descriptors of the lock files this process holds; closed only when the process exits.
_held_locks: list[int] = []


def scheduler_job_id() -> str | None:
    """Return the id of the PBS or Slurm job this process runs in, or None outside one."""
    for name in JOB_ID_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _nvidia_smi_gpus() -> list[str] | None:
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    count = sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
    return [str(index) for index in range(count)]


def _torch_gpus() -> list[str] | None:
    command = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        count = int(result.stdout.strip())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return [str(index) for index in range(count)]


def node_gpus() -> list[str]:
    """Return the GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs).

    Raises:
        ValueError: if LMPRUNE_NODE_GPUS is set to anything but an integer of at least 0.
    """
    override = os.environ.get(NODE_GPUS_ENV, "").strip()
    if override:
        if not override.isdigit():
            raise ValueError(f"{NODE_GPUS_ENV} must be the number of GPUs on the node, got {override!r}")
        return [str(index) for index in range(int(override))]

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
        # CUDA stops at the first invalid entry; -1 and NoDevFiles are the usual ways to hide all.
        if entries and entries[0] in ("-1", "NoDevFiles"):
            return []
        return entries

    gpus = _nvidia_smi_gpus()
    if gpus is not None:
        return gpus
    # Without NVIDIA (/dev/nvidiaN) or AMD (/dev/kfd) device files there is no GPU to count, and
    # the torch probe would only cost a torch import.
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return []
    return _torch_gpus() or []


def lock_folder(job_id: str) -> Path:
    """Return the node-local folder of the GPU lock files of one scheduler job.

    It lies in LMPRUNE_GPU_LOCK_DIR, or else in the temporary folder (TMPDIR or /tmp), which is
    local to the node on clusters. The user id keeps users apart, the job id keeps jobs apart.
    """
    base = Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)
    return base / f"lmprune-gpus-{os.getuid()}-{safe_id}"


def _try_lock(path: Path) -> int | None:
    """Return an open descriptor that holds an exclusive flock on ``path``, or None if taken."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return descriptor


def _lock_free_gpus(folder: Path, gpus: list[str], count: int) -> list[int] | None:
    """Lock ``count`` free GPUs and return their positions in ``gpus``, or None if too few are free.

    When fewer than ``count`` are free, it releases the locks it took. No process holds some
    GPUs while it waits for more, so processes that wait cannot block each other.
    """
    locked: list[tuple[int, int]] = []
    for position in range(len(gpus)):
        descriptor = _try_lock(folder / f"gpu{position}.lock")
        if descriptor is not None:
            locked.append((position, descriptor))
            if len(locked) == count:
                _held_locks.extend(descriptor for _, descriptor in locked)
                return [position for position, _ in locked]
    for _, descriptor in locked:
        os.close(descriptor)
    return None


def claim_gpu(count: int = 1, timeout: float | None = None, poll_seconds: float = 5.0) -> list[str] | None:
    """Reserve ``count`` GPUs of the node for this process and make them its only visible GPUs.

    Call it before anything initialises CUDA (``torch.cuda.is_available()`` does), because
    CUDA reads CUDA_VISIBLE_DEVICES once per process. It does nothing and returns None outside
    a PBS or Slurm job, when the node has fewer than 2 GPUs, and when ``count`` is 0 or at least
    the number of GPUs (the job uses them all). Otherwise it waits until ``count`` GPUs are
    free, locks them until the process exits, sets CUDA_VISIBLE_DEVICES to them, logs the choice
    and returns them.

    Raises:
        TimeoutError: if ``timeout`` seconds pass before enough GPUs are free.
        ValueError: if ``count`` is negative or not an integer.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a whole number of GPUs, got {count!r}")

    job_id = scheduler_job_id()
    if job_id is None:
        log.debug("not in a PBS or Slurm job: GPUs left as they are")
        return None
    gpus = node_gpus()
    if len(gpus) < 2 or count == 0 or count >= len(gpus):
        log.debug("job %s: %d GPU(s) visible, %d requested: GPUs left as they are", job_id, len(gpus), count)
        return None

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning(
            "CUDA is already initialised in this process, so setting CUDA_VISIBLE_DEVICES has no "
            "effect; call claim_gpu() before the first CUDA call"
        )

    folder = lock_folder(job_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting_logged = False
    while True:
        positions = _lock_free_gpus(folder, gpus, count)
        if positions is not None:
            break
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"fewer than {count} of the {len(gpus)} GPUs in job {job_id} were free after {timeout} s")
        if not waiting_logged:
            log.info("job %s: all %d GPUs are taken by other jobs of this node; waiting for %d", job_id, len(gpus), count)
            waiting_logged = True
        time.sleep(poll_seconds)

    claimed = [gpus[position] for position in positions]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    log.info(
        "job %s on %s: using GPU %s of %d (CUDA_VISIBLE_DEVICES=%s)",
        job_id, socket.gethostname(), ",".join(claimed), len(gpus), os.environ["CUDA_VISIBLE_DEVICES"],
    )
    return claimed
