"""Collect every latency JSON into one CSV: a row per model, method and sparsity."""

import json

from lmprune.io import atomic_output_path
from lmprune.jobs import start_job
from lmprune.latency import latency_table

log = start_job(snakemake.log[0])
records = []
for path in snakemake.input:
    with open(path) as handle:
        records.append(json.load(handle))

table = latency_table(records)
with atomic_output_path(snakemake.output[0]) as temporary:
    table.to_csv(temporary, index=False)
log.info("wrote %d rows from %d latency files to %s", len(table), len(records), snakemake.output[0])
