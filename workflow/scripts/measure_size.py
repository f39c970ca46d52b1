"""Measure one checkpoint's bytes on disk and under each general-purpose codec."""

import json
from pathlib import Path

from lmprune.io import write_json_atomic
from lmprune.jobs import checkpoint_fields, environment, start_job
from lmprune.sizes import measure_checkpoint

log = start_job(snakemake.log[0], snakemake.threads)
checkpoint = Path(snakemake.input.checkpoint)
pruning = json.loads((checkpoint / "pruning.json").read_text())

log.info("measuring sizes of %s with %s", checkpoint, snakemake.params.codecs)
sizes = measure_checkpoint(checkpoint, snakemake.params.codecs, snakemake.params.chunk_bytes)
for codec, result in sizes["codecs"].items():
    log.info("%s: %s: ratio %.3f at %.1f MiB/s", checkpoint, codec, result["ratio"], result["throughput_mib_s"])

write_json_atomic(
    snakemake.output[0],
    {
        **checkpoint_fields(checkpoint, pruning),
        **sizes,
        "environment": environment(),
    },
)
