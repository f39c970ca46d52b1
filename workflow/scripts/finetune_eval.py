"""Fine-tune one pruned checkpoint on one task, evaluate it and write the benchmark JSON."""

import json
from pathlib import Path

from lmprune.benchmark import TASKS
from lmprune.finetune import pick_device
from lmprune.io import write_json_atomic
from lmprune.jobs import environment, start_job

log = start_job(snakemake.log[0], snakemake.threads)
checkpoint = Path(snakemake.input.checkpoint)
pruning = json.loads((checkpoint / "pruning.json").read_text())
task = snakemake.wildcards.task
device = pick_device(snakemake.params.device)

log.info(
    "fine-tuning %s (%s pruning, sparsity %s) on %s on %s%s",
    pruning["model"], pruning["method"], pruning["sparsity_target"], task, device,
    "" if snakemake.params.keep_masks else " WITHOUT masks",
)
if pruning["untrained"]:
    log.warning("UNTRAINED: %s has random weights (a test model); its metrics mean nothing", pruning["model"])

record = TASKS[task](
    checkpoint,
    snakemake.params.family,
    snakemake.params.settings,
    snakemake.params.data_settings,
    snakemake.params.local_dir,
    snakemake.params.seed,
    snakemake.params.keep_masks,
    device,
    trust_remote_code=snakemake.params.trust_remote_code,
)

write_json_atomic(
    snakemake.output[0],
    {
        "model": pruning["model"],
        "family": pruning["family"],
        "method": pruning["method"],
        "sparsity": pruning["sparsity_target"],
        "sparsity_label": snakemake.wildcards.sparsity,
        "untrained": pruning["untrained"],
        "checkpoint": str(checkpoint),
        "source": pruning["source"],
        "seed": snakemake.params.seed,
        "settings": snakemake.params.settings,
        "device": str(device),
        **record,
        "environment": {**environment(), "device": str(device)},
    },
)
log.info("wrote %s", snakemake.output[0])
