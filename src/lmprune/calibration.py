"""Layer-by-layer pruning with calibration inputs: Wanda, SparseGPT, N:M and FFN neurons.

The methods here act on the ``nn.Linear`` (and GPT-2 ``Conv1D``) weights inside the transformer
layers. Embeddings, poolers and task heads stay dense. Each stack of layers (BERT's encoder,
GPT-2's decoder, BART's encoder then decoder) is processed one layer at a time:

1. the inputs of the stack's first layer are captured by running the model up to that layer on
   the calibration windows (for BART's decoder this runs the already-pruned encoder);
2. for each layer: the layer moves to the calibration device, and hooks collect the statistics
   of every Linear's inputs over all windows (input norms for Wanda and FFN neurons, the Hessian
   ``2/n X^T X`` for SparseGPT). Then the layer's weights are pruned, and the windows run through
   the pruned layer again to give the next layer its inputs;
3. the layer moves back to the CPU.

Only one layer's activations and statistics are held at a time, so a model whose activations
for every layer would not fit in memory still calibrates. The model itself stays on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lmprune import masks, structured
from lmprune.data import DataError, causal_lm_blocks
from lmprune.methods import MethodSpec

__all__ = ["CalibrationSettings", "calibration_windows", "layer_stacks", "prune_layers"]

log = logging.getLogger(__name__)

_LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class CalibrationSettings:
    """Settings of a calibration run: windows per forward pass, device, and SparseGPT's solver settings."""

    batch_size: int = 16
    device: torch.device = torch.device("cpu")
    block_size: int = 128
    dampening: float = 0.01


def calibration_windows(tokenizer, texts: list[str], samples: int, seq_length: int, seed: int,
                        max_positions: int | None = None) -> Tensor:
    """Draw ``samples`` windows of ``seq_length`` token ids from ``texts``.

    The non-blank lines are tokenized into one stream (as :func:`lmprune.data.causal_lm_blocks`
    does), cut into consecutive windows, and ``samples`` of them are drawn without replacement
    with a generator seeded by ``seed``. Each window starts and ends with the special tokens
    the tokenizer adds to a single text (``[CLS] ... [SEP]`` for BERT, ``<s> ... </s>`` for BART,
    none for GPT-2), so a window looks like a model input; the text part is shortened to keep
    the total at ``seq_length``.

    Returns:
        A LongTensor of shape [samples, seq_length].

    Raises:
        DataError: if the text gives fewer than ``samples`` windows, or ``seq_length`` is too
            long for the model or too short to hold the special tokens and one text token.
    """
    prefix, suffix = _special_tokens(tokenizer)
    text_length = seq_length - len(prefix) - len(suffix)
    if text_length < 1:
        raise DataError(
            f"pruning.calibration.seq_length={seq_length} leaves no room for text after the "
            f"{len(prefix) + len(suffix)} special tokens. Use a seq_length of at least 8."
        )
    if max_positions is not None and seq_length > max_positions:
        raise DataError(
            f"pruning.calibration.seq_length={seq_length} exceeds the model's {max_positions} "
            f"positions. Set pruning.calibration.seq_length to {max_positions} or less."
        )
    blocks = causal_lm_blocks(tokenizer, texts, text_length)
    if len(blocks) < samples:
        raise DataError(
            f"pruning.calibration.samples={samples} windows of {seq_length} tokens asked for, but the "
            f"calibration text gives only {len(blocks)}. Lower pruning.calibration.samples or "
            "seq_length, or calibrate on a larger text."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(blocks), generator=generator)[:samples].sort().values
    windows = blocks[chosen]
    parts = [torch.tensor(prefix, dtype=torch.long).expand(samples, -1), windows,
             torch.tensor(suffix, dtype=torch.long).expand(samples, -1)]
    return torch.cat(parts, dim=1)


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Return the stacks of transformer layers in ``model``, as ``(name, layers)`` in forward order.

    A stack is an ``nn.ModuleList`` of at least one layer, all of one class, each holding at
    least one Linear or Conv1D, that is not itself inside another stack: ``encoder.layer``
    for BERT, ``transformer.h`` for GPT-2, ``model.encoder.layers`` and ``model.decoder.layers``
    for BART.

    Raises:
        ValueError: if the model has no such stack.
    """
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in stacks):
            continue
        classes = {type(layer) for layer in module}
        has_linear = all(any(isinstance(m, _LINEAR_TYPES) for m in layer.modules()) for layer in module)
        if len(classes) == 1 and has_linear:
            stacks.append((name, module))
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} has no list of transformer layers with Linear weights, so it "
            "cannot be pruned layer by layer. Use magnitude, magnitude-layer or random."
        )
    return stacks


def layer_linears(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the Linear and Conv1D modules of one transformer layer, as ``(name, module)``."""
    return [(name, module) for name, module in layer.named_modules() if isinstance(module, _LINEAR_TYPES)]


@torch.no_grad()
def prune_layers(model: nn.Module, spec: MethodSpec, sparsity: float, windows: Tensor | None,
                 settings: CalibrationSettings) -> dict:
    """Prune the Linear weights of every transformer layer of ``model`` in place, with ``spec``.

    ``spec`` is a layer-wise method (:attr:`MethodSpec.layerwise`): Wanda, SparseGPT, an N:M
    pattern or FFN-neuron removal. Calibrated methods need ``windows``, the token ids from
    :func:`calibration_windows` (shape [samples, seq_length]); ``magnitude-2of4`` and
    ``magnitude-4of8`` do not read them. For ``structured-ffn``, ``sparsity`` is the fraction of
    FFN neurons removed; the model's config gets the new FFN width.

    Returns:
        A JSON-ready dict: ``layers`` (one entry per layer with the names of the weights
        pruned) and, for ``structured-ffn``, the report of :func:`lmprune.structured.prune_ffn_`.
    """
    if spec.calibrated and windows is None:
        raise ValueError(f"method {spec.name} needs calibration windows")
    if spec.structured:
        blocks = {id(block.down): block for block in structured.ffn_blocks(model)}
        activation_norms = {}

        def prune_layer(name, layer, statistics):
            # NOTE: structured-ffn only records each layer's activation norms here and removes
            # the neurons of all layers at the end, so every layer is scored on the dense
            # model's activations rather than on those of the already-pruned layers below.
            for module_name, module in layer_linears(layer):
                if id(module) in blocks:
                    activation_norms[blocks[id(module)].name] = statistics[module_name].norms().cpu()
            return {"layer": name}
    else:
        prune_layer = _layer_pruner(spec, sparsity, settings)

    layers = []
    for stack_name, stack in layer_stacks(model):
        if not spec.calibrated:
            for index, layer in enumerate(stack):
                layers.append(prune_layer(f"{stack_name}.{index}", layer, None))
            continue

        batches = _capture_stack_inputs(model, stack, windows, settings)
        for index, layer in enumerate(stack):
            name = f"{stack_name}.{index}"
            layer.to(settings.device)
            statistics = _collect_statistics(layer, batches, hessian=spec.base == "sparsegpt")
            layers.append(prune_layer(name, layer, statistics))
            batches = _run_layer(layer, batches)
            layer.to("cpu")
            log.info("%s %s on %d calibration windows", "scored" if spec.structured else "pruned", name, len(windows))

    report = {"layers": layers}
    if spec.structured:
        report["structured"] = structured.prune_ffn_(model, sparsity, activation_norms)
    return report


def _layer_pruner(spec: MethodSpec, sparsity: float,
                  settings: CalibrationSettings) -> Callable[[str, nn.Module, dict | None], dict]:
    """Return a function that prunes the Linear weights of one layer given their input statistics."""

    def prune_layer(name, layer, statistics):
        pruned = []
        for module_name, module in layer_linears(layer):
            weight = _out_in_weight(module)
            if spec.base == "sparsegpt":
                masks.sparsegpt_prune_(
                    weight, statistics[module_name].hessian(),
                    None if spec.group else sparsity, kept=spec.kept, group=spec.group,
                    block_size=settings.block_size, dampening=settings.dampening,
                )
            else:
                if spec.base == "wanda":
                    scores = masks.wanda_scores(weight, statistics[module_name].norms())
                else:
                    scores = weight.detach().abs().float()
                if spec.group:
                    mask = masks.n_m_mask(scores, spec.kept, spec.group)
                else:
                    mask = masks.row_lowest_mask(scores, sparsity)
                weight.masked_fill_(mask, 0)
            pruned.append(module_name)
        return {"layer": name, "weights": pruned}

    return prune_layer


def _out_in_weight(module: nn.Module) -> Tensor:
    """Return the module's weight as an (out_features, in_features) view (Conv1D stores it transposed)."""
    weight = module.weight.data
    return weight.t() if isinstance(module, Conv1D) else weight


class _StopForward(Exception):
    """Raised by the hook on a stack's first layer once its inputs are captured."""


def _capture_stack_inputs(model: nn.Module, stack: nn.ModuleList, windows: Tensor,
                          settings: CalibrationSettings) -> list[tuple[tuple, dict]]:
    """Run the model on each batch of windows up to ``stack[0]`` and return that layer's inputs.

    Returns one ``(args, kwargs)`` pair per batch, with tensors on the calibration device.
    """
    captured = []

    def capture(module, args, kwargs):
        captured.append((_to_device(args, settings.device), _to_device(kwargs, settings.device)))
        raise _StopForward

    handle = stack[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in windows.split(settings.batch_size):
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(windows.split(settings.batch_size)):
        raise RuntimeError("the model's forward pass did not reach its first transformer layer")
    return captured


def _collect_statistics(layer: nn.Module, batches: list[tuple[tuple, dict]], hessian: bool) -> dict:
    """Run every batch through ``layer`` and return one InputStatistics per Linear in it."""
    statistics = {}
    handles = []
    for name, module in layer_linears(layer):
        in_features = _out_in_weight(module).shape[1]
        statistics[name] = masks.InputStatistics(in_features, hessian=hessian, device=module.weight.device)
        handles.append(module.register_forward_hook(_statistics_hook(statistics[name])))
    try:
        for args, kwargs in batches:
            layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def _statistics_hook(statistics: masks.InputStatistics):
    def hook(module, inputs, output):
        statistics.update(inputs[0].detach())

    return hook


def _run_layer(layer: nn.Module, batches: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Return the batches with their hidden states replaced by ``layer``'s outputs."""
    updated = []
    for args, kwargs in batches:
        output = layer(*args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        if args:
            updated.append(((hidden, *args[1:]), kwargs))
        else:
            updated.append((args, {**kwargs, "hidden_states": hidden}))
    return updated


def _to_device(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Return the ids the tokenizer puts before and after a single text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []
