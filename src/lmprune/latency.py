"""Inference latency of a pruned checkpoint against its dense source model.

:func:`measure_latency` loads both models, runs the same batch of random token ids through
each and times whole forward passes. The timed passes alternate between the models, and the
order within each round rotates every round, so a change in machine load during the job slows
both models alike. Latency is wall time per batch (``time.perf_counter``, with
``torch.cuda.synchronize`` before and after each pass on CUDA). Throughput is computed from
the median latency.

Unstructured zeros do not make dense kernels faster, so speed-ups come from models that are
smaller (structured pruning) or from sparse kernels. For N:M methods with the 2:4 pattern
(names ending in ``-2of4``) the pruned model is also timed with its 2:4-sparse ``nn.Linear``
weights converted by ``torch.sparse.to_sparse_semi_structured``, where the GPU and dtype allow
it.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from lmprune.config import sparsity_from_label
from lmprune.finetune import pick_device
from lmprune.models import is_untrained, load_model
from lmprune.pruning import measure_sparsity, prunable_weights

__all__ = [
    "LATENCY_COLUMNS",
    "LatencySettingsError",
    "is_2of4_sparse",
    "latency_table",
    "max_sequence_length",
    "measure_latency",
    "resolve_dtype",
    "semi_structured_problems",
]

log = logging.getLogger(__name__)

SEMI_STRUCTURED_SUFFIX = "-2of4"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# RoBERTa-style models number positions from pad_token_id + 1, so max_position_embeddings
# (514 in roberta-base) counts rows that no token can use.
# NOTE: only these model types get the offset. Other types that number positions this way are not listed.
_PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")

# Columns of results/tables/latency.csv, in order.
LATENCY_COLUMNS = (
    "model", "method", "sparsity", "latency_ms", "dense_latency_ms", "speedup", "tokens_per_s",
    "dense_tokens_per_s", "parameters", "dense_parameters", "semi_structured_available",
    "semi_structured_speedup", "device", "dtype", "batch_size", "seq_length", "untrained",
)


class LatencySettingsError(ValueError):
    """Latency settings that cannot run on a model, with the value and the fix."""


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Return the torch dtype for ``requested``: "auto" is float16 on CUDA and float32 on the CPU."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise LatencySettingsError(f"invalid latency dtype {requested!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def max_sequence_length(config: PretrainedConfig) -> tuple[int, str] | None:
    """Return the maximum number of tokens per sequence that a model accepts, and the config key behind it.

    Returns None for models without learned absolute positions (T5's relative positions, for
    example), which this check cannot bound.
    """
    for key in ("n_positions", "max_position_embeddings"):
        value = config.to_dict().get(key)
        if isinstance(value, int) and value > 0:
            break
    else:
        return None
    if config.model_type in _PADDING_OFFSET_MODEL_TYPES and config.pad_token_id is not None:
        return value - config.pad_token_id - 1, f"{key} = {value} minus the padding offset {config.pad_token_id + 1}"
    return value, f"{key} = {value}"


def _check_settings(batch_size: int, seq_length: int, warmup: int, repeats: int) -> None:
    for name, value, minimum in (
        ("batch_size", batch_size, 1), ("seq_length", seq_length, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LatencySettingsError(f"invalid latency {name} {value!r}: expected a whole number >= {minimum}")


def _check_seq_length(folder: Path, seq_length: int, trust_remote_code: bool) -> PretrainedConfig:
    """Read the config in ``folder`` and raise when ``seq_length`` exceeds its positions."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    limit = max_sequence_length(config)
    if limit is not None and seq_length > limit[0]:
        raise LatencySettingsError(
            f"latency seq_length {seq_length} is longer than the {limit[0]} positions that the model "
            f"in {str(folder)!r} supports ({limit[1]} in its config.json). Set latency: seq_length "
            f"to {limit[0]} or less in the config."
        )
    return config


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _linear_zero_fraction(model: nn.Module) -> float:
    """Return the fraction of zeros in the weights of every ``nn.Linear`` and GPT-2 ``Conv1D``.

    Weights tied to an embedding (most LM heads) are left out, so the fraction describes the
    matrices that matrix multiplications read.
    """
    zeros, numel, _ = measure_sparsity(prunable_weights(model, include_embeddings=False))
    return zeros / numel if numel else 0.0


def _random_batch(
    config: PretrainedConfig, vocab_size: int, batch_size: int, seq_length: int, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Build token ids drawn uniformly from ``[0, vocab_size)`` with an all-ones attention mask.

    Encoder-decoder models get ``decoder_input_ids`` of the same shape, drawn from the same
    generator after the encoder ids.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_length)
    batch = {
        "input_ids": torch.randint(0, vocab_size, shape, generator=generator),
        "attention_mask": torch.ones(shape, dtype=torch.long),
    }
    if config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(0, vocab_size, shape, generator=generator)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def semi_structured_problems(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Return why the 2:4 sparse kernels cannot run on ``device`` in ``dtype``, or an empty list when they can.

    The conditions: ``torch.sparse.to_sparse_semi_structured`` exists, the device is CUDA (torch
    2.13 converts CUDA tensors only), its compute capability is 8.0 or newer (the requirement in
    the PyTorch semi-structured sparsity tutorial), and the dtype is float16 or bfloat16. Those
    two dtypes are the ones that both torch 2.13 backends accept: CUTLASS also takes float32,
    but cuSPARSELt does not.
    """
    problems = []
    if device.type != "cuda":
        problems.append(f"device is {device.type}, and the 2:4 sparse kernels need a CUDA GPU")
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            problems.append(f"GPU compute capability is {major}.{minor}, and the 2:4 sparse kernels need 8.0 or newer")
    if dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"dtype is {str(dtype).removeprefix('torch.')}, and the 2:4 sparse kernels need float16 or bfloat16")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        problems.append(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
    return problems


def is_2of4_sparse(weight: torch.Tensor) -> bool:
    """Return True when every group of 4 consecutive values in each row of ``weight`` has at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4 != 0:
        return False
    groups = weight.detach().reshape(weight.shape[0], -1, 4)
    return bool(((groups == 0).sum(dim=-1) >= 2).all())


def _convert_to_semi_structured(model: nn.Module) -> tuple[int, int, str | None, str | None]:
    """Convert the 2:4-sparse ``nn.Linear`` weights of ``model`` in place.

    Weights without the 2:4 pattern, and weights shared with an embedding (tied LM heads), stay
    dense. GPT-2's ``Conv1D`` projections stay dense too, because they are not ``nn.Linear``.

    Returns:
        The number of converted weights, the number of 2:4-sparse weights that the conversion
        rejected (shapes outside the kernels' limits, for example), the first rejection message
        and the torch backend of the converted weights ("cutlass" or "cusparselt").
    """
    embedding_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    converted = rejected = 0
    first_error = backend = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in embedding_weights:
            continue
        if not is_2of4_sparse(module.weight):
            continue
        try:
            sparse_weight = torch.sparse.to_sparse_semi_structured(module.weight.detach())
        except (RuntimeError, ValueError) as error:
            rejected += 1
            first_error = first_error or f"{name}: {error}"
            continue
        module.weight = nn.Parameter(sparse_weight, requires_grad=False)
        converted += 1
        backend = getattr(sparse_weight, "BACKEND", None)
    return converted, rejected, first_error, backend


def _time_forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """Run one forward pass and return its wall time in milliseconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def _warm_up_converted(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, warmup: int) -> str | None:
    """Run the untimed passes of the 2:4 model and return why it failed, or None when it ran.

    It runs at least one pass, so a model that the 2:4 kernels cannot run is found before timing.
    """
    # Any error is recorded instead of failing the job, because the 2:4 timing is an extra
    # measurement on top of the dense-format one.
    try:
        for _ in range(max(1, warmup)):
            _time_forward(model, batch, device)
    except Exception as error:  # noqa: BLE001
        return f"forward pass with 2:4 sparse weights failed: {error}"
    return None


def _time_rounds(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], device: torch.device, repeats: int
) -> dict[str, list[float]]:
    """Time ``repeats`` rounds of one pass per model, rotating the order every round.

    Returns the wall times in ms per model name. The rotation puts every model in every position
    equally often (with 2 models: first in alternate rounds) when ``repeats`` is a multiple of
    the number of models.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for _ in range(repeats):
        for name in order:
            times[name].append(_time_forward(models[name], batch, device))
        order = order[1:] + order[:1]
    return times


def _timing_summary(times_ms: Sequence[float], batch_size: int, seq_length: int) -> dict[str, Any]:
    median_ms = float(np.median(times_ms))
    return {
        "median_ms": median_ms,
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(np.mean(times_ms)),
        "min_ms": float(np.min(times_ms)),
        "tokens_per_s": batch_size * seq_length / (median_ms / 1000.0),
        "sequences_per_s": batch_size / (median_ms / 1000.0),
        "times_ms": [float(value) for value in times_ms],
    }


def _model_record(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Describe a loaded model before it is cast to the timing dtype."""
    return {
        "folder": str(folder),
        "architecture": type(model).__name__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "linear_zero_fraction": _linear_zero_fraction(model),
        "untrained": is_untrained(model),
    }


def _read_method(checkpoint_folder: Path) -> str | None:
    record = checkpoint_folder / "pruning.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("method")


def _prepare_semi_structured(
    pruned: nn.Module, method: str | None, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Any], nn.Module | None]:
    """Return the 2:4 record so far and a converted copy of ``pruned``, or None when unavailable."""
    if method is None or not method.endswith(SEMI_STRUCTURED_SUFFIX):
        return {"applicable": False}, None

    problems = semi_structured_problems(device, dtype)
    if problems:
        return {"applicable": True, "available": False, "reason": "; ".join(problems)}, None

    converted_model = copy.deepcopy(pruned)
    # Any error of the conversion is recorded instead of failing the job, as in _warm_up_converted.
    try:
        converted, rejected, first_error, backend = _convert_to_semi_structured(converted_model)
    except Exception as error:  # noqa: BLE001
        return {"applicable": True, "available": False, "reason": f"conversion failed: {error}"}, None
    if converted == 0:
        reason = "no nn.Linear weight has the 2:4 pattern"
        if first_error:
            reason = f"the conversion rejected every 2:4-sparse nn.Linear weight ({rejected}), first: {first_error}"
        return {"applicable": True, "available": False, "reason": reason}, None

    record = {
        "applicable": True,
        "available": True,
        "backend": backend,
        "converted_layers": converted,
        "rejected_layers": rejected,
    }
    if first_error:
        record["first_rejection"] = first_error
    return record, converted_model


def measure_latency(
    checkpoint_folder: str | Path,
    dense_folder: str | Path,
    *,
    batch_size: int,
    seq_length: int,
    warmup: int,
    repeats: int,
    device: str,
    dtype: str,
    seed: int = 0,
    method: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Time forward passes of a checkpoint and of its dense source on one random batch.

    Args:
        checkpoint_folder: the pruned transformers folder.
        dense_folder: the dense source folder the checkpoint was pruned from.
        batch_size, seq_length: the shape of the token-id batch. Encoder-decoder models get
            decoder ids of the same shape. Throughput counts the ``batch_size * seq_length``
            input tokens of one batch.
        warmup: untimed forward passes per model before timing.
        repeats: timed forward passes per model.
        device: "auto", "cpu", "cuda" or "cuda:N" (see :func:`lmprune.finetune.pick_device`).
        dtype: "auto" (float16 on CUDA, float32 on the CPU), "float32", "float16" or "bfloat16".
        seed: seed of the generator for the token ids.
        method: the pruning method; None reads it from the checkpoint's pruning.json if present.
            Names ending in ``-2of4`` are also timed with 2:4 sparse kernels where possible.
        trust_remote_code: passed to the transformers loaders.

    Returns:
        A JSON-ready dict. ``dense`` and ``pruned`` each contain the median, p90, mean and min
        latency in ms per batch, every timed value, the throughput, the parameter count and the
        zero fraction of the Linear/Conv1D weights. ``speedup`` is the dense median over the
        pruned median, and ``semi_structured`` is the 2:4 record. The other keys are the device,
        dtype, threads and batch settings.

    Raises:
        LatencySettingsError: for invalid settings, or a ``seq_length`` longer than either
            model's position limit.
        ValueError: for a device that this host cannot use.
    """
    checkpoint_folder = Path(checkpoint_folder)
    dense_folder = Path(dense_folder)
    _check_settings(batch_size, seq_length, warmup, repeats)
    torch_device = pick_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # Both configs are checked before any weights load, so a bad setting fails in seconds.
    config = _check_seq_length(checkpoint_folder, seq_length, trust_remote_code)
    _check_seq_length(dense_folder, seq_length, trust_remote_code)
    if method is None:
        method = _read_method(checkpoint_folder)

    models = {
        "dense": load_model(dense_folder, trust_remote_code=trust_remote_code),
        "pruned": load_model(checkpoint_folder, trust_remote_code=trust_remote_code),
    }
    records = {
        "dense": _model_record(models["dense"], dense_folder),
        "pruned": _model_record(models["pruned"], checkpoint_folder),
    }
    for model in models.values():
        # One forward pass per batch: no key/value cache is kept for later steps.
        model.config.use_cache = False
        model.to(device=torch_device, dtype=torch_dtype)
    vocab_size = min(model.get_input_embeddings().num_embeddings for model in models.values())
    batch = _random_batch(config, vocab_size, batch_size, seq_length, seed, torch_device)

    semi_structured, converted_model = _prepare_semi_structured(models["pruned"], method, torch_device, torch_dtype)
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                _time_forward(model, batch, torch_device)
        if converted_model is not None:
            failure = _warm_up_converted(converted_model, batch, torch_device, warmup)
            if failure is None:
                models["semi_structured"] = converted_model
            else:
                semi_structured = {"applicable": True, "available": False, "reason": failure}
        if semi_structured.get("available") is False:
            log.warning("2:4 sparse kernels not timed for %s: %s", checkpoint_folder, semi_structured["reason"])
        times = _time_rounds(models, batch, torch_device, repeats)

    for name in ("dense", "pruned"):
        records[name] |= _timing_summary(times[name], batch_size, seq_length)
    dense_median = records["dense"]["median_ms"]
    if "semi_structured" in times:
        summary = _timing_summary(times["semi_structured"], batch_size, seq_length)
        semi_structured |= summary | {
            "speedup": dense_median / summary["median_ms"],
            "speedup_over_pruned": records["pruned"]["median_ms"] / summary["median_ms"],
        }

    return {
        "method": method,
        "device": torch_device.type,
        "device_name": _device_name(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_length": seq_length,
        "tokens_per_batch": batch_size * seq_length,
        "encoder_decoder": bool(config.is_encoder_decoder),
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
        "untrained": records["dense"]["untrained"] or records["pruned"]["untrained"],
        "dense": records["dense"],
        "pruned": records["pruned"],
        "speedup": dense_median / records["pruned"]["median_ms"],
        "semi_structured": semi_structured,
    }


def latency_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Flatten latency JSONs (one per model, method and sparsity) into one table.

    Returns a DataFrame with ``LATENCY_COLUMNS``, sorted by model, method and sparsity.
    ``sparsity`` is the checkpoint's target fraction, or the fraction parsed from
    ``sparsity_label`` when a record has none. ``semi_structured_available`` is empty for methods
    without the 2:4 pattern, and ``semi_structured_speedup`` is empty unless the 2:4 kernels ran.
    """
    rows = []
    for record in records:
        sparsity = record.get("sparsity")
        if sparsity is None:
            sparsity = sparsity_from_label(record["sparsity_label"])
        semi_structured = record.get("semi_structured") or {}
        rows.append(
            {
                "model": record["model"],
                "method": record["method"],
                "sparsity": float(sparsity),
                "latency_ms": record["pruned"]["median_ms"],
                "dense_latency_ms": record["dense"]["median_ms"],
                "speedup": record["speedup"],
                "tokens_per_s": record["pruned"]["tokens_per_s"],
                "dense_tokens_per_s": record["dense"]["tokens_per_s"],
                "parameters": record["pruned"]["parameters"],
                "dense_parameters": record["dense"]["parameters"],
                "semi_structured_available": semi_structured.get("available"),
                "semi_structured_speedup": semi_structured.get("speedup"),
                "device": record["device"],
                "dtype": record["dtype"],
                "batch_size": record["batch_size"],
                "seq_length": record["seq_length"],
                "untrained": bool(record.get("untrained", False)),
            }
        )
    table = pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))
    return table.sort_values(["model", "method", "sparsity"], kind="stable", ignore_index=True)
