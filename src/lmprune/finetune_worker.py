"""One worker process of a multi-process (DDP) fine-tune job.

:func:`lmprune.distributed.launch_workers` starts one per process through torchrun::

    python -m torch.distributed.run --standalone --local-addr 127.0.0.1 --nproc-per-node N \
        -m lmprune.finetune_worker JOB_JSON

``JOB_JSON`` contains the arguments of :func:`lmprune.benchmark.run_job`, plus ``log`` (the job's
log file, which every rank appends to with ``rank N`` in each line), ``threads`` (torch threads
of this process) and ``device_type`` ("cuda" or "cpu").
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from lmprune.benchmark import run_job
from lmprune.distributed import init_worker
from lmprune.jobs import start_job


# torchrun's record decorator passes a worker's exception to torchrun, whose failure summary then
# shows it.
@record
def main(argv: list[str] | None = None) -> int:
    """Run this rank's part of the job described by the JSON file in ``argv[0]``."""
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1 or "RANK" not in os.environ:
        print("usage: python -m torch.distributed.run ... -m lmprune.finetune_worker JOB_JSON "
              "(the worker needs the RANK and LOCAL_RANK variables that torchrun sets)", file=sys.stderr)
        return 2
    job = json.loads(Path(arguments[0]).read_text())

    log = start_job(job["log"], job["threads"], rank=int(os.environ["RANK"]))
    context, device = init_worker(job["device_type"])
    log.info("joined the %s process group: rank %d of %d on %s", context.backend, context.rank, context.world_size, device)
    try:
        run_job(job, device, context)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
