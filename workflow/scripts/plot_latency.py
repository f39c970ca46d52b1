"""Plot one latency column against sparsity, one line per model and method."""

import pandas

from lmprune.jobs import start_job
from lmprune.plots import plot_metric_vs_sparsity

log = start_job(snakemake.log[0])
metric = snakemake.params.metric
table = pandas.read_csv(snakemake.input[0])
devices = ", ".join(sorted(f"{device} {dtype}" for device, dtype in set(zip(table["device"], table["dtype"]))))
plot_metric_vs_sparsity(table, metric["column"], metric["label"], snakemake.output[0], title=f"Latency ({devices}): {metric['label']}")
log.info("drew %s from %d rows", snakemake.output[0], len(table))
