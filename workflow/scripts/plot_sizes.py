"""Plot checkpoint size against sparsity, one panel per model and one line per codec."""

import pandas

from lmprune.jobs import start_job
from lmprune.plots import plot_size_vs_sparsity

log = start_job(snakemake.log[0])
table = pandas.read_csv(snakemake.input[0])
plot_size_vs_sparsity(table, snakemake.output[0])
log.info("drew %s from %d rows", snakemake.output[0], len(table))
