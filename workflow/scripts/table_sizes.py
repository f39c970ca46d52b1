"""Collect every size JSON into one CSV: a row per model, method, sparsity and codec."""

import json

from lmprune.io import atomic_output_path
from lmprune.jobs import start_job
from lmprune.plots import size_table

log = start_job(snakemake.log[0], offline=True)
records = []
for path in snakemake.input:
    with open(path) as handle:
        records.append(json.load(handle))

table = size_table(records)
with atomic_output_path(snakemake.output[0]) as temporary:
    table.to_csv(temporary, index=False)
log.info("wrote %d rows from %d size files to %s", len(table), len(records), snakemake.output[0])
