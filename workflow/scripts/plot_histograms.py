"""Draw the weight histograms of one checkpoint: the whole model and one panel per layer."""

import json
from pathlib import Path

from lmprune.histograms import plot_layer_histograms, plot_model_histogram, weight_histograms
from lmprune.io import write_json_atomic
from lmprune.jobs import start_job
from lmprune.models import load_model
from lmprune.pruning import prunable_weights

log = start_job(snakemake.log[0], snakemake.threads)
checkpoint = Path(snakemake.input.checkpoint)
pruning = json.loads((checkpoint / "pruning.json").read_text())

model = load_model(checkpoint, trust_remote_code=pruning["trust_remote_code"])
named_weights = [(name, parameter.detach()) for name, parameter in prunable_weights(model, snakemake.params.include_embeddings)]
histograms = weight_histograms(named_weights, bins=snakemake.params.bins, value_range=None)

title = f"{pruning['model']}, {pruning['method']} pruning, sparsity {pruning['sparsity_target']:.1%}"
if pruning["untrained"]:
    title += " (UNTRAINED random weights)"
plot_model_histogram(histograms, snakemake.output.model, title)
plot_layer_histograms(histograms, snakemake.output.layers, title)
write_json_atomic(snakemake.output.counts, {"model": pruning["model"], "method": pruning["method"], "sparsity": pruning["sparsity_target"], **histograms.to_dict()})
log.info("drew weight histograms of %s at sparsity %s", pruning["model"], pruning["sparsity_target"])
