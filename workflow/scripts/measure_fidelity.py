"""Compare one pruned checkpoint's final hidden states with the dense source model's on held-out text."""

import json
from pathlib import Path

from lmprune.data import load_clm_corpora
from lmprune.fidelity import held_out_lines, measure_fidelity
from lmprune.gpus import claim_gpu
from lmprune.io import write_json_atomic
from lmprune.jobs import checkpoint_fields, environment, start_job

log = start_job(snakemake.log[0], snakemake.threads)
# Before CUDA starts, so that jobs packed onto one multi-GPU node each get their own GPU.
claim_gpu(snakemake.resources.gpu)
settings = snakemake.params.settings
checkpoint = Path(snakemake.input.checkpoint)
pruning = json.loads((checkpoint / "pruning.json").read_text())
source = json.loads(Path(snakemake.input.source).read_text())
if pruning["untrained"]:
    log.warning("UNTRAINED: %s has random weights (a test model); its fidelity means nothing", pruning["model"])

# The eval split: test.txt in a local data folder, data.clm's eval_split on the hub.
held_out = load_clm_corpora(snakemake.params.data_settings, snakemake.params.local_dir)[1]
where = held_out.provenance.get("path") or f"{held_out.provenance.get('dataset')} split {held_out.provenance.get('split')}"
lines = held_out_lines(held_out.texts, settings["samples"], source=where)

log.info(
    "measuring fidelity of %s (%s pruning, sparsity %s) to the dense model %s on %d lines of %s",
    pruning["model"], pruning["method"], pruning["sparsity_target"], source["folder"], len(lines), where,
)
result = measure_fidelity(
    checkpoint,
    source["folder"],
    lines,
    max_length=settings["max_length"],
    batch_size=settings["batch_size"],
    device=settings["device"],
    trust_remote_code=snakemake.params.trust_remote_code,
)
log.info(
    "%s %s %s: relative error %.6g, cosine %.6f (min %.6f) on %s",
    pruning["model"], pruning["method"], snakemake.wildcards.sparsity,
    result["relative_error"], result["cosine"], result["min_cosine"], result["device"],
)

write_json_atomic(
    snakemake.output[0],
    {
        **checkpoint_fields(checkpoint, pruning),
        "dense": source,
        **result,
        "text": {**held_out.provenance, "selection": f"first {len(lines)} non-blank lines that are not section headings"},
        "settings": settings,
        "environment": environment(result["device"]),
    },
)
