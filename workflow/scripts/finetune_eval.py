"""Fine-tune one pruned checkpoint on one task, evaluate it and write the benchmark JSON.

One process trains unless the job may use several: on CUDA the GPUs it was given (the gpu
resource), on the CPU LMPRUNE_CPU_PROCESSES. With more than one, torchrun starts a DDP worker
per process (lmprune.finetune_worker), and rank 0 writes the JSON. docs/distributed.md has the
details.
"""

from lmprune.benchmark import run_job
from lmprune.distributed import launch_workers, process_count
from lmprune.finetune import pick_device
from lmprune.gpus import claim_gpu
from lmprune.jobs import start_job

log = start_job(snakemake.log[0], snakemake.threads)
claim_gpu(snakemake.resources.gpu)  # before CUDA starts: a packed job pins each fine-tune to its own GPUs
device = pick_device(snakemake.params.device)
processes = process_count(device, snakemake.params.gpus)

job = {
    "checkpoint": snakemake.input.checkpoint,
    "task": snakemake.wildcards.task,
    "sparsity_label": snakemake.wildcards.sparsity,
    "family": snakemake.params.family,
    "settings": snakemake.params.settings,
    "data_settings": snakemake.params.data_settings,
    "local_dir": snakemake.params.local_dir,
    "seed": snakemake.params.seed,
    "keep_masks": snakemake.params.keep_masks,
    "trust_remote_code": snakemake.params.trust_remote_code,
    "output": snakemake.output[0],
    # Read by the DDP workers, which append their lines to the same log.
    "log": snakemake.log[0],
    "device_type": device.type,
}

if processes == 1:
    run_job(job, device)
else:
    launch_workers(job, processes, snakemake.threads)
