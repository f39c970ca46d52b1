"""Prune one model at one sparsity with one method and save the checkpoint."""

import json

from lmprune.jobs import environment, start_job
from lmprune.models import is_untrained, load_model, save_checkpoint
from lmprune.pruning import prune_model

log = start_job(snakemake.log[0], snakemake.threads)
model_name = snakemake.wildcards.model
method = snakemake.wildcards.method
sparsity = snakemake.params.sparsity

with open(snakemake.input.source) as handle:
    source = json.load(handle)

model = load_model(source["folder"], trust_remote_code=snakemake.params.trust_remote_code)
untrained = is_untrained(model)
if untrained:
    log.warning("UNTRAINED: %s has random weights (a test model); its metrics mean nothing", model_name)

log.info("pruning %s with %s to sparsity %s", model_name, method, sparsity)
report = prune_model(model, method, sparsity, include_embeddings=snakemake.params.include_embeddings)
log.info(
    "pruned %s: %d of %d prunable weights are zero (sparsity %.6f, threshold |w| = %.6g)",
    model_name, report.num_pruned, report.num_weights, report.sparsity_achieved, report.threshold,
)

metadata = {
    "model": model_name,
    "family": snakemake.params.family,
    "method": method,
    "sparsity_label": snakemake.wildcards.sparsity,
    "untrained": untrained,
    "source": source,
    "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
    "include_embeddings": snakemake.params.include_embeddings,
    "trust_remote_code": snakemake.params.trust_remote_code,
    **report.to_dict(),
    "environment": environment(),
}
has_tokenizer = save_checkpoint(model, source["folder"], snakemake.output.checkpoint, metadata={"pruning.json": metadata})
log.info("saved %s (tokenizer: %s)", snakemake.output.checkpoint, "yes" if has_tokenizer else "none in source")
