"""Plot one fidelity metric against sparsity, one line per model and method."""

import pandas

from lmprune.jobs import start_job
from lmprune.plots import plot_metric_vs_sparsity

log = start_job(snakemake.log[0])
metric = snakemake.params.metric
table = pandas.read_csv(snakemake.input[0])
title = f"Zero-shot fidelity to the dense model: {metric['label']}"
plot_metric_vs_sparsity(table, metric["column"], metric["label"], snakemake.output[0], title=title)
log.info("drew %s from %d rows", snakemake.output[0], len(table))
