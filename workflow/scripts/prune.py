"""Prune one model at one sparsity with one method and save the checkpoint."""

import json

from transformers import AutoTokenizer

from lmprune import data
from lmprune.calibration import CalibrationSettings, calibration_windows
from lmprune.finetune import pick_device
from lmprune.gpus import claim_gpu
from lmprune.jobs import environment, start_job
from lmprune.methods import method_spec
from lmprune.models import is_untrained, load_model, save_checkpoint
from lmprune.pruning import prune_model

log = start_job(snakemake.log[0], snakemake.threads)
# Before CUDA starts, so that calibration jobs packed onto one multi-GPU node each get their own GPU.
claim_gpu(snakemake.resources.gpu)
model_name = snakemake.wildcards.model
method = snakemake.wildcards.method
sparsity = snakemake.params.sparsity
spec = method_spec(method)

with open(snakemake.input.source) as handle:
    source = json.load(handle)

model = load_model(source["folder"], trust_remote_code=snakemake.params.trust_remote_code)
untrained = is_untrained(model)
if untrained:
    log.warning("UNTRAINED: %s has random weights (a test model); its metrics mean nothing", model_name)

# The rule passes calibration and sparsegpt settings only to the methods that read them.
calibration = snakemake.params.calibration
sparsegpt = snakemake.params.sparsegpt or {}
settings = CalibrationSettings(
    batch_size=calibration["batch_size"] if calibration else 1,
    device=pick_device(calibration["device"]) if calibration else pick_device("cpu"),
    **({"block_size": sparsegpt["block_size"], "dampening": sparsegpt["dampening"]} if sparsegpt else {}),
)
windows = None
calibration_record = None
if spec.calibrated and sparsity > 0:
    train, _ = data.load_clm_corpora(snakemake.params.data_settings, snakemake.params.local_dir)
    tokenizer = AutoTokenizer.from_pretrained(source["folder"])
    windows = calibration_windows(
        tokenizer, train.texts, calibration["samples"], calibration["seq_length"], snakemake.params.seed,
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )
    calibration_record = {**calibration, "device": str(settings.device), "seed": snakemake.params.seed, "text": train.provenance}
    log.info(
        "calibrating %s on %d windows of %d tokens from %s, layer by layer on %s",
        model_name, windows.shape[0], windows.shape[1], train.provenance.get("path") or train.provenance.get("hub"), settings.device,
    )

log.info("pruning %s with %s to sparsity %s", model_name, method, sparsity)
report = prune_model(
    model, method, sparsity, include_embeddings=snakemake.params.include_embeddings,
    seed=snakemake.params.seed or 0, windows=windows, settings=settings,
)
log.info(
    "pruned %s with %s: %d of %d weights in scope %r are zero or removed (sparsity %.6f; %.6f over all prunable weights)",
    model_name, method, round(report.sparsity_achieved * report.num_weights), report.num_weights, report.scope,
    report.sparsity_achieved, report.model_sparsity,
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
    "calibration": calibration_record,
    "sparsegpt": snakemake.params.sparsegpt,
    "seed": snakemake.params.seed,
    **report.to_dict(),
    "environment": environment(settings.device if calibration_record else "cpu"),
}
has_tokenizer = save_checkpoint(model, source["folder"], snakemake.output.checkpoint, metadata={"pruning.json": metadata})
log.info("saved %s (tokenizer: %s)", snakemake.output.checkpoint, "yes" if has_tokenizer else "none in source")
