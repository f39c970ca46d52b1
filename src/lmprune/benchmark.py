"""Fine-tune and evaluate one pruned checkpoint on one task: the steps behind finetune_eval.

``run_clm`` and ``run_qnli`` each load the checkpoint with the task's head, load and encode the
data, fine-tune with the checkpoint's zero mask kept, evaluate, and return a JSON-ready record
of the metrics, the run times, the sparsity before and after fine-tuning, and where the data
came from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lmprune import data, finetune
from lmprune.pruning import measure_sparsity, prunable_weights

log = logging.getLogger(__name__)

PERPLEXITY_DEFINITION = (
    "exp(mean token cross-entropy in nats) over non-overlapping blocks of block_size tokens of the "
    "model's own tokenizer; each block predicts its last block_size - 1 tokens from the tokens "
    "before them in the same block, with no context across blocks"
)


def _tracked_weights(model: torch.nn.Module, new_parameter_names: set[str]) -> list:
    """Return the prunable weights that came from the checkpoint (new heads left out)."""
    return [
        (name, weight)
        for name, weight in prunable_weights(model, include_embeddings=True)
        if name not in new_parameter_names
    ]


def _sparsity(named_weights: list) -> float:
    zeros, numel, _ = measure_sparsity(named_weights)
    return zeros / numel if numel else 0.0


def _prepare(model, new_parameter_names, keep_masks: bool, device: torch.device):
    """Move ``model`` to ``device`` and build the masks that keep its zeros through training."""
    model.to(device)
    tracked = _tracked_weights(model, new_parameter_names)
    masks = finetune.SparsityMasks.from_model(model, tracked) if keep_masks else None
    return tracked, masks


def _finish_record(record: dict, tracked: list, masks, keep_masks: bool, sparsity_before: float) -> dict:
    sparsity_after = _sparsity(tracked)
    record["masks_kept"] = keep_masks
    record["mask_memory_bytes"] = masks.memory_bytes if masks is not None else 0
    record["sparsity_before"] = sparsity_before
    record["sparsity_after"] = sparsity_after
    if keep_masks and sparsity_after != sparsity_before:
        raise RuntimeError(
            f"sparsity changed during fine-tuning with masks kept: {sparsity_before} before, "
            f"{sparsity_after} after. This is a bug in mask keeping."
        )
    return record


def run_clm(checkpoint: str | Path, family: str, settings: dict, data_settings: dict,
            local_dir: str | None, seed: int, keep_masks: bool, device: torch.device,
            trust_remote_code: bool = False) -> dict:
    """Fine-tune ``checkpoint`` as a causal LM on WikiText-2 and report loss and perplexity.

    Args:
        settings: the config's ``finetune.clm`` block (block_size, train_blocks, eval_blocks,
            epochs, learning_rate, weight_decay, warmup_ratio, batch_size, eval_batch_size).
        data_settings: the config's ``data.clm`` block (hub dataset id, config, splits).
        local_dir: folder of local copies, or None to read the hub.
    """
    finetune.set_seed(seed)
    model, new_parameter_names = finetune.load_task_model(checkpoint, "clm", family, trust_remote_code)
    tokenizer = _load_tokenizer(checkpoint)
    tracked, masks = _prepare(model, new_parameter_names, keep_masks, device)
    sparsity_before = _sparsity(tracked)

    train_corpus, eval_corpus = data.load_clm_corpora(data_settings, local_dir)
    max_positions = _max_positions(model)
    block_size = settings["block_size"]
    train_blocks = data.causal_lm_blocks(tokenizer, train_corpus.texts, block_size, settings["train_blocks"], max_positions=max_positions)
    eval_blocks = data.causal_lm_blocks(tokenizer, eval_corpus.texts, block_size, settings["eval_blocks"], max_positions=max_positions)
    log.info("CLM data: %d training and %d evaluation blocks of %d tokens", len(train_blocks), len(eval_blocks), block_size)

    record = {"task": "clm", "block_size": block_size, "perplexity_definition": PERPLEXITY_DEFINITION}
    record["dataset"] = {"train": train_corpus.provenance, "eval": eval_corpus.provenance}
    record["train_blocks"] = len(train_blocks)
    record["train_tokens"] = int(train_blocks.numel())

    lm_head_pretrained = finetune.lm_head_is_pretrained(model, new_parameter_names)
    if lm_head_pretrained:
        zero_shot = finetune.evaluate_causal_lm(model, eval_blocks, batch_size=settings["eval_batch_size"], device=device)
        record["zero_shot"] = {"applicable": True, **_as_dict(zero_shot)}
        log.info("zero-shot eval: loss %.4f, perplexity %.2f", zero_shot.eval_loss, zero_shot.perplexity)
    else:
        record["zero_shot"] = {
            "applicable": False,
            "reason": "the LM head is newly initialised: the checkpoint has no pretrained output layer for this task",
        }
        log.info("zero-shot eval not applicable: the LM head is new")

    loader = DataLoader(
        [{"input_ids": block, "labels": block} for block in train_blocks],
        batch_size=settings["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trained = finetune.train(
        model, loader, epochs=settings["epochs"], learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"], warmup_ratio=settings["warmup_ratio"],
        device=device, masks=masks, log=log,
    )
    evaluated = finetune.evaluate_causal_lm(model, eval_blocks, batch_size=settings["eval_batch_size"], device=device)
    log.info("fine-tuned CLM eval: loss %.4f, perplexity %.2f", evaluated.eval_loss, evaluated.perplexity)

    record["train"] = _as_dict(trained)
    record["eval"] = _as_dict(evaluated)
    record["eval_loss"] = evaluated.eval_loss
    record["perplexity"] = evaluated.perplexity
    record["train_runtime_s"] = trained.train_runtime_s
    record["train_samples_per_s"] = trained.train_samples_per_s
    record["eval_runtime_s"] = evaluated.eval_runtime_s
    return _finish_record(record, tracked, masks, keep_masks, sparsity_before)


def run_qnli(checkpoint: str | Path, family: str, settings: dict, data_settings: dict,
             local_dir: str | None, seed: int, keep_masks: bool, device: torch.device,
             trust_remote_code: bool = False) -> dict:
    """Fine-tune ``checkpoint`` as a two-label classifier on GLUE QNLI and report accuracy.

    Args:
        settings: the config's ``finetune.qnli`` block (train_samples, eval_samples,
            max_length, epochs, learning_rate, weight_decay, warmup_ratio, batch_size,
            eval_batch_size).
        data_settings: the config's ``data.qnli`` block.
        local_dir: folder of local copies, or None to read the hub.
    """
    finetune.set_seed(seed)
    model, new_parameter_names = finetune.load_task_model(checkpoint, "qnli", family, trust_remote_code)
    tokenizer = _load_tokenizer(checkpoint)
    if tokenizer.pad_token is None:
        # GPT-2 has no padding token; padding positions are masked out, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    tracked, masks = _prepare(model, new_parameter_names, keep_masks, device)
    sparsity_before = _sparsity(tracked)

    max_positions = _max_positions(model)
    if max_positions is not None and settings["max_length"] > max_positions:
        raise data.DataError(
            f"finetune.qnli.max_length = {settings['max_length']} is above the model's maximum of "
            f"{max_positions} positions. Lower max_length."
        )
    train_corpus, eval_corpus = data.load_qnli_corpora(
        data_settings, local_dir, settings["train_samples"], settings["eval_samples"], seed
    )
    log.info("QNLI data: %d training and %d evaluation pairs", len(train_corpus), len(eval_corpus))
    collate = data.collate_pairs(tokenizer)
    train_loader = DataLoader(
        data.encode_pairs(tokenizer, train_corpus, settings["max_length"]),
        batch_size=settings["batch_size"], shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    eval_loader = DataLoader(
        data.encode_pairs(tokenizer, eval_corpus, settings["max_length"]),
        batch_size=settings["eval_batch_size"], shuffle=False, collate_fn=collate,
    )

    record = {"task": "qnli", "max_length": settings["max_length"]}
    record["dataset"] = {"train": train_corpus.provenance, "eval": eval_corpus.provenance}
    record["train_samples"] = len(train_corpus)
    record["eval_samples"] = len(eval_corpus)

    trained = finetune.train(
        model, train_loader, epochs=settings["epochs"], learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"], warmup_ratio=settings["warmup_ratio"],
        device=device, masks=masks, log=log,
    )
    evaluated = finetune.evaluate_classification(model, eval_loader, device=device)
    log.info("fine-tuned QNLI eval: accuracy %.4f on %d pairs", evaluated.accuracy, evaluated.eval_samples)

    record["train"] = _as_dict(trained)
    record["eval"] = _as_dict(evaluated)
    record["accuracy"] = evaluated.accuracy
    record["eval_loss"] = evaluated.eval_loss
    record["train_runtime_s"] = trained.train_runtime_s
    record["train_samples_per_s"] = trained.train_samples_per_s
    record["eval_runtime_s"] = evaluated.eval_runtime_s
    return _finish_record(record, tracked, masks, keep_masks, sparsity_before)


def _load_tokenizer(checkpoint: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def _max_positions(model: torch.nn.Module) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _as_dict(result) -> dict:
    from dataclasses import asdict

    return asdict(result)


TASKS = {"clm": run_clm, "qnli": run_qnli}
