"""Fine-tune and evaluate one pruned checkpoint on one task: the steps behind finetune_eval.

``run_clm`` and ``run_qnli`` each load the checkpoint with the task's head, load and encode the
data, fine-tune with the checkpoint's zero mask kept, evaluate, and return a JSON-ready record
of the metrics, the run times, the sparsity before and after fine-tuning, and where the data
came from. ``run_job`` wraps either one for a whole finetune_eval job and writes the JSON.

In a DDP run (``distributed`` given) every rank calls the same function. All ranks load the
model and the data and train together. Rank 0 alone runs the evaluations, on the whole
evaluation set as a single process would, and writes the JSON. The other ranks return None.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lmprune import data, finetune
from lmprune.distributed import DistributedContext
from lmprune.io import write_json_atomic
from lmprune.jobs import environment
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


def _training_loader(samples: list, batch_size: int, seed: int, distributed: DistributedContext | None,
                     collate_fn=None) -> DataLoader:
    """Return a loader that shuffles ``samples`` with ``seed`` into batches of ``batch_size``.

    In a DDP run ``batch_size`` is the global batch. Each rank draws its shard through a
    DistributedSampler and takes ``batch_size / world_size`` samples per step. The number of
    optimizer steps and the learning rate schedule therefore do not depend on the process count.
    """
    if distributed is None:
        return DataLoader(samples, batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(seed))
    sampler = DistributedSampler(samples, num_replicas=distributed.world_size, rank=distributed.rank,
                                 shuffle=True, seed=seed)
    return DataLoader(samples, batch_size=distributed.local_batch_size(batch_size), sampler=sampler,
                      collate_fn=collate_fn)


def _train(model, loader: DataLoader, settings: dict, device: torch.device, masks,
           distributed: DistributedContext | None) -> finetune.TrainResult:
    """Fine-tune ``model`` in place with a task's settings block (epochs, learning rate, ...)."""
    return finetune.train(
        model, loader, epochs=settings["epochs"], learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"], warmup_ratio=settings["warmup_ratio"],
        device=device, masks=masks, log=log, distributed=distributed,
    )


def _add_results(record: dict, trained: finetune.TrainResult, evaluated) -> None:
    """Copy the training and evaluation results, and the headline run times, into ``record``."""
    record["train"] = _as_dict(trained)
    record["eval"] = _as_dict(evaluated)
    record["eval_loss"] = evaluated.eval_loss
    record["train_runtime_s"] = trained.train_runtime_s
    record["train_samples_per_s"] = trained.train_samples_per_s
    record["eval_runtime_s"] = evaluated.eval_runtime_s


def run_clm(checkpoint: str | Path, family: str, settings: dict, data_settings: dict,
            local_dir: str | None, seed: int, keep_masks: bool, device: torch.device,
            trust_remote_code: bool = False, distributed: DistributedContext | None = None) -> dict | None:
    """Fine-tune ``checkpoint`` as a causal LM on WikiText-2 and report loss and perplexity.

    Args:
        settings: the config's ``finetune.clm`` block (block_size, train_blocks, eval_blocks,
            epochs, learning_rate, weight_decay, warmup_ratio, batch_size, eval_batch_size).
        data_settings: the config's ``data.clm`` block (hub dataset id, config, splits).
        local_dir: folder of local copies, or None to read the hub.
        distributed: this process's rank in a DDP run, or None for a single process.

    Returns:
        The record, or None on DDP ranks other than 0.
    """
    is_main = distributed is None or distributed.is_main
    model, new_parameter_names, tokenizer = _load_for_task(checkpoint, "clm", family, trust_remote_code, seed)
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

    if is_main:  # DDP: rank 0 alone evaluates
        record["zero_shot"] = _evaluate_zero_shot(model, new_parameter_names, eval_blocks, settings["eval_batch_size"], device)

    loader = _training_loader(
        [{"input_ids": block, "labels": block} for block in train_blocks],
        settings["batch_size"], seed, distributed,
    )
    record["batch_size_per_process"] = loader.batch_size
    trained = _train(model, loader, settings, device, masks, distributed)
    if not is_main:
        return None
    evaluated = finetune.evaluate_causal_lm(model, eval_blocks, batch_size=settings["eval_batch_size"], device=device)
    log.info("fine-tuned CLM eval: loss %.4f, perplexity %.2f", evaluated.eval_loss, evaluated.perplexity)

    record["perplexity"] = evaluated.perplexity
    _add_results(record, trained, evaluated)
    return _finish_record(record, tracked, masks, keep_masks, sparsity_before)


def _evaluate_zero_shot(model, new_parameter_names: set[str], eval_blocks: torch.Tensor, batch_size: int,
                        device: torch.device) -> dict:
    """Evaluate the CLM model before fine-tuning, or return why that does not apply."""
    lm_head_pretrained = finetune.lm_head_is_pretrained(model, new_parameter_names)
    if lm_head_pretrained:
        zero_shot = finetune.evaluate_causal_lm(model, eval_blocks, batch_size=batch_size, device=device)
        log.info("zero-shot eval: loss %.4f, perplexity %.2f", zero_shot.eval_loss, zero_shot.perplexity)
        return {"applicable": True, **_as_dict(zero_shot)}
    log.info("zero-shot eval not applicable: the LM head is new")
    return {
        "applicable": False,
        "reason": "the LM head is newly initialised: the checkpoint has no pretrained output layer for this task",
    }


def run_qnli(checkpoint: str | Path, family: str, settings: dict, data_settings: dict,
             local_dir: str | None, seed: int, keep_masks: bool, device: torch.device,
             trust_remote_code: bool = False, distributed: DistributedContext | None = None) -> dict | None:
    """Fine-tune ``checkpoint`` as a two-label classifier on GLUE QNLI and report accuracy.

    Args:
        settings: the config's ``finetune.qnli`` block (train_samples, eval_samples,
            max_length, epochs, learning_rate, weight_decay, warmup_ratio, batch_size,
            eval_batch_size).
        data_settings: the config's ``data.qnli`` block.
        local_dir: folder of local copies, or None to read the hub.
        distributed: this process's rank in a DDP run, or None for a single process.

    Returns:
        The record, or None on DDP ranks other than 0.
    """
    is_main = distributed is None or distributed.is_main
    model, new_parameter_names, tokenizer = _load_for_task(checkpoint, "qnli", family, trust_remote_code, seed)
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
    train_loader = _training_loader(
        data.encode_pairs(tokenizer, train_corpus, settings["max_length"]),
        settings["batch_size"], seed, distributed, collate_fn=collate,
    )
    eval_loader = DataLoader(
        data.encode_pairs(tokenizer, eval_corpus, settings["max_length"]),
        batch_size=settings["eval_batch_size"], shuffle=False, collate_fn=collate,
    )

    record = {"task": "qnli", "max_length": settings["max_length"]}
    record["dataset"] = {"train": train_corpus.provenance, "eval": eval_corpus.provenance}
    record["train_samples"] = len(train_corpus)
    record["eval_samples"] = len(eval_corpus)
    record["batch_size_per_process"] = train_loader.batch_size

    trained = _train(model, train_loader, settings, device, masks, distributed)
    if not is_main:
        return None
    evaluated = finetune.evaluate_classification(model, eval_loader, device=device)
    log.info("fine-tuned QNLI eval: accuracy %.4f on %d pairs", evaluated.accuracy, evaluated.eval_samples)

    record["accuracy"] = evaluated.accuracy
    _add_results(record, trained, evaluated)
    return _finish_record(record, tracked, masks, keep_masks, sparsity_before)


def _load_for_task(checkpoint: str | Path, task: str, family: str, trust_remote_code: bool, seed: int):
    """Seed the run, then load ``checkpoint`` with ``task``'s head and its tokenizer.

    Returns:
        The model, the names of its newly initialised parameters, and the tokenizer.
    """
    finetune.set_seed(seed)
    model, new_parameter_names = finetune.load_task_model(checkpoint, task, family, trust_remote_code)
    return model, new_parameter_names, _load_tokenizer(checkpoint)


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


def run_job(job: dict, device: torch.device, distributed: DistributedContext | None = None) -> None:
    """Fine-tune and evaluate one checkpoint on one task and write the finetune_eval JSON.

    Args:
        job: JSON-serialisable arguments, so that the finetune_eval script can hand them to
            DDP workers in a file: ``checkpoint`` (a pruned checkpoint folder with its
            pruning.json), ``task``, ``sparsity_label``, ``family``, ``settings``,
            ``data_settings``, ``local_dir``, ``seed``, ``keep_masks``, ``trust_remote_code``
            and ``output`` (the JSON path).
        device: where this process trains.
        distributed: this process's rank in a DDP run, or None for a single process. Only rank
            0 writes the JSON, with ``world_size`` and ``backend`` set from it. A single
            process records world_size 1 and backend None.
    """
    checkpoint = Path(job["checkpoint"])
    pruning = json.loads((checkpoint / "pruning.json").read_text())
    task = job["task"]
    if distributed is None or distributed.is_main:
        log.info(
            "fine-tuning %s (%s pruning, sparsity %s) on %s on %s%s",
            pruning["model"], pruning["method"], pruning["sparsity_target"], task, device,
            "" if job["keep_masks"] else " WITHOUT masks",
        )
        if pruning["untrained"]:
            log.warning("UNTRAINED: %s has random weights (a test model); its metrics mean nothing", pruning["model"])

    record = TASKS[task](
        checkpoint, job["family"], job["settings"], job["data_settings"], job["local_dir"],
        job["seed"], job["keep_masks"], device,
        trust_remote_code=job["trust_remote_code"], distributed=distributed,
    )
    if record is None:
        return

    write_json_atomic(
        job["output"],
        {
            "model": pruning["model"],
            "family": pruning["family"],
            "method": pruning["method"],
            "sparsity": pruning["sparsity_target"],
            "sparsity_label": job["sparsity_label"],
            "untrained": pruning["untrained"],
            "checkpoint": str(checkpoint),
            "source": pruning["source"],
            "seed": job["seed"],
            "settings": job["settings"],
            "device": str(device),
            "world_size": distributed.world_size if distributed is not None else 1,
            "backend": distributed.backend if distributed is not None else None,
            **record,
            "environment": environment(device),
        },
    )
    log.info("wrote %s", job["output"])
