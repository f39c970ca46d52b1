"""Time one checkpoint against its dense source model and write the latency JSON."""

import json
from pathlib import Path

from lmprune.gpus import claim_gpu
from lmprune.io import write_json_atomic
from lmprune.jobs import environment, start_job
from lmprune.latency import measure_latency

log = start_job(snakemake.log[0], snakemake.threads)
# Called before CUDA starts, so that each job of a packed scheduler job gets its own GPU.
claim_gpu(snakemake.resources.gpu)
model_name = snakemake.wildcards.model
method = snakemake.wildcards.method
label = snakemake.wildcards.sparsity
checkpoint = Path(snakemake.input.checkpoint)
pruning = json.loads((checkpoint / "pruning.json").read_text())
with open(snakemake.input.source) as handle:
    source = json.load(handle)

settings = {
    name: getattr(snakemake.params, name)
    for name in ("batch_size", "seq_length", "warmup", "repeats", "device", "dtype")
}
untrained = bool(pruning.get("untrained"))
if untrained:
    log.warning("UNTRAINED: %s has random weights (a test model); its timings describe only its shapes", model_name)
log.info("timing %s %s %s against the dense %s with %s", model_name, method, label, source["folder"], settings)

result = measure_latency(
    checkpoint,
    source["folder"],
    **settings,
    method=pruning.get("method", method),
    trust_remote_code=snakemake.params.trust_remote_code,
)
untrained = untrained or result.pop("untrained")

log.info(
    "measured %s %s %s on %s: %.3g ms vs dense %.3g ms, speed-up %.2fx",
    model_name, method, label, result["device"],
    result["pruned"]["median_ms"], result["dense"]["median_ms"], result["speedup"],
)
# lmprune.latency has already logged the reason when the 2:4 kernels could not be timed.
semi_structured = result["semi_structured"]
if semi_structured.get("available"):
    log.info(
        "with 2:4 sparse kernels (%s, %d Linear weights converted): %.3g ms, speed-up %.2fx",
        semi_structured["backend"], semi_structured["converted_layers"], semi_structured["median_ms"],
        semi_structured["speedup"],
    )
elif not semi_structured["applicable"]:
    log.info("2:4 sparse kernels: not applicable to method %s", method)

write_json_atomic(
    snakemake.output[0],
    {
        "model": pruning.get("model", model_name),
        "sparsity": pruning.get("sparsity_target"),
        "sparsity_label": label,
        "sparsity_achieved": pruning.get("sparsity_achieved"),
        "untrained": untrained,
        "checkpoint": str(checkpoint),
        "source": source,
        "settings": settings,
        **result,
        "environment": environment(result["device"]),
    },
)
