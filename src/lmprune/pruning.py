"""Pruning of transformer language models: global magnitude, per-matrix methods and dispatch.

:func:`prune_model` is the entry point for every method of :mod:`lmprune.methods`. This module
implements the methods that act on every prunable weight: global ``magnitude``,
``magnitude-layer`` and ``random``. The layer-wise methods (Wanda, SparseGPT, N:M,
``structured-ffn``) are in :mod:`lmprune.calibration`.

The prunable set of a model is every weight matrix of ``nn.Linear``, of
``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, stored as
``(in_features, out_features)``) and, optionally, of ``nn.Embedding``. Each
parameter counts once even when tied to several modules.

Magnitude pruning zeroes the ``round(sparsity * N)`` weights with the smallest
``|w|`` over all ``N`` prunable weights together. It selects the same weights as
``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured)``
except among weights equal to the boundary value, where this module prunes in
tensor order, then flattened (row-major) index order, and torch's ``topk`` gives
no guarantee.

Unlike torch, the boundary value is found without concatenating the scores:
a two-pass radix select over the IEEE-754 bit patterns of ``|w|`` as float32
(non-negative floats order like their bit patterns read as integers). Each pass
builds a 65536-bin histogram chunk by chunk, so temporaries are bounded by
``chunk_numel`` elements however large the model is.
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lmprune import masks
from lmprune.methods import METHOD_NAMES, method_spec

__all__ = [
    "PRUNING_METHODS",
    "GlobalThreshold",
    "PruningReport",
    "apply_global_threshold_",
    "find_global_threshold",
    "measure_sparsity",
    "prunable_weights",
    "prune_model",
]

PRUNING_METHODS = METHOD_NAMES

DEFAULT_CHUNK_NUMEL = 2**24

# The dtypes whose values convert to float32 exactly, so that the order and the
# ties of |w| in float32 are those of the stored weights.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_ABS_MASK = 0x7FFF_FFFF  # clears the sign bit of a float32 bit pattern
_INF_BITS = 0x7F80_0000  # bit pattern of +inf; larger patterns are NaN
_HALF_BITS = 16
_NUM_BINS = 1 << _HALF_BITS


@dataclass
class GlobalThreshold:
    """Boundary of a global magnitude pruning mask over a sequence of tensors.

    A weight ``w`` is pruned when ``|w| < threshold``, or when ``|w| == threshold``
    and it is among the first ``num_ties_to_prune`` such weights in tensor order,
    then flattened index order. ``num_below + num_ties_to_prune == num_to_prune``.
    """

    threshold: float
    num_weights: int
    num_to_prune: int
    num_below: int
    num_ties_to_prune: int


@dataclass
class PruningReport:
    """Summary of one :func:`prune_model` call.

    ``scope`` names the weights the method acts on: ``"prunable"`` (every weight of
    :func:`prunable_weights`), ``"layers"`` (the Linear and Conv1D weights inside the
    transformer layers) or ``"ffn"`` (the FFN weights, for ``structured-ffn``). ``num_weights`` counts the weights in scope and
    ``sparsity_achieved`` is zeros / ``num_weights`` after pruning, so it exceeds
    ``sparsity_target`` when weights were zero beforehand. ``num_pruned`` counts the
    weights selected by global magnitude's mask (including weights already zero) and,
    for the other methods, the zeros added. ``threshold`` is global magnitude's boundary
    value and None for the other methods. ``model_sparsity`` is the fraction of zeros
    over all of :func:`prunable_weights`, the same set for every method. For
    ``structured-ffn``, ``num_weights`` counts the FFN weights before pruning,
    ``num_pruned`` those removed, and ``tensors`` lists the layer weights left. Each entry of ``tensors`` has the keys ``name``,
    ``shape``, ``numel``, ``zeros`` and ``sparsity``; ``details`` holds what the method
    reports besides (calibration, per-layer records, the structured report).
    """

    method: str
    sparsity_target: float
    threshold: float | None
    num_weights: int
    num_pruned: int
    sparsity_achieved: float
    scope: str = "prunable"
    model_sparsity: float | None = None
    tensors: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the report as a dict of JSON-serialisable values."""
        return asdict(self)


def prunable_weights(model: nn.Module, include_embeddings: bool = True) -> list[tuple[str, nn.Parameter]]:
    """Return the weight matrices that pruning acts on, as ``(name, parameter)`` pairs.

    The set is the ``weight`` of every ``nn.Linear``, ``Conv1D`` and, when
    ``include_embeddings`` is true, ``nn.Embedding`` (word, position and
    token-type embeddings) in ``model``. Biases, LayerNorm and all other
    parameters are left out. With ``include_embeddings=False``, a parameter that
    is an embedding's weight stays out even when a tied ``nn.Linear`` (an LM
    head) shares it.

    A parameter shared by several modules appears once, under the first name
    that ``model.named_parameters()`` gives it, and the list follows that order.
    """
    prunable_types: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
    if include_embeddings:
        prunable_types += (nn.Embedding,)

    selected_ids = set()
    embedding_ids = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if isinstance(module, prunable_types):
            selected_ids.add(id(weight))
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(weight))
    if not include_embeddings:
        selected_ids -= embedding_ids

    # named_parameters() removes duplicates, so each tied parameter comes once.
    return [(name, param) for name, param in model.named_parameters() if id(param) in selected_ids]


def find_global_threshold(
    weights: Sequence[Tensor],
    sparsity: float,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    *,
    names: Sequence[str] | None = None,
) -> GlobalThreshold:
    """Find the magnitude below which ``round(sparsity * N)`` weights are pruned.

    ``N`` is the total number of elements of ``weights``, which must be distinct
    tensors of dtype float32, float16 or bfloat16. Reads the weights twice and
    modifies nothing. For contiguous weights the only large temporary is one
    int32 buffer of ``min(chunk_numel, largest numel)`` elements, reused for
    every chunk.

    Args:
        weights: tensors of any shape, on any device.
        sparsity: fraction of the weights to prune, in ``[0, 1)``. The number
            pruned is ``round(sparsity * N)`` with Python's ``round``, as in
            ``torch.nn.utils.prune``.
        chunk_numel: number of elements processed per step.
        names: names of ``weights`` for error messages; indices are used if omitted.

    Raises:
        ValueError: if ``sparsity`` is outside ``[0, 1)``, ``chunk_numel`` is not
            positive, ``names`` has the wrong length, or a tensor contains NaN.
        TypeError: if a tensor has an unsupported dtype.
    """
    _check_sparsity(sparsity)
    _check_chunk_numel(chunk_numel)
    names = _tensor_names(weights, names)
    for name, weight in zip(names, weights):
        _check_dtype(name, weight)

    num_weights = sum(weight.numel() for weight in weights)
    num_to_prune = round(sparsity * num_weights)
    workspace = _ChunkWorkspace(weights, chunk_numel)

    high_histogram = _histogram_high_bits(weights, names, workspace)
    if num_to_prune == 0:
        return GlobalThreshold(0.0, num_weights, 0, 0, 0)

    # The k-th smallest |w| (k = num_to_prune, counted from 1) lies in the first
    # bucket whose cumulative count reaches k.
    high_bits, num_below_bucket = _select_bin(high_histogram, num_to_prune)
    bucket_start = high_bits << _HALF_BITS
    low_histogram = _histogram_low_bits(weights, bucket_start, workspace)
    low_bits, num_below_in_bucket = _select_bin(low_histogram, num_to_prune - num_below_bucket)

    num_below = num_below_bucket + num_below_in_bucket
    return GlobalThreshold(
        threshold=_bits_to_float32(bucket_start | low_bits),
        num_weights=num_weights,
        num_to_prune=num_to_prune,
        num_below=num_below,
        num_ties_to_prune=num_to_prune - num_below,
    )


@torch.no_grad()
def apply_global_threshold_(
    weights: Sequence[Tensor],
    threshold: GlobalThreshold,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> list[int]:
    """Zero the weights selected by ``threshold``, in place.

    ``weights`` must be the tensors, in the same order, that ``threshold`` was
    found on. Zeroes every weight with ``|w| < threshold.threshold`` and the
    first ``threshold.num_ties_to_prune`` weights equal to it in tensor order,
    then flattened index order. Works on ``chunk_numel`` elements at a time with
    reused buffers of about 6 bytes per element.

    Returns:
        The number of weights selected in each tensor, counting weights that were
        already zero. The counts sum to ``threshold.num_to_prune``.

    Raises:
        ValueError: if the weights do not match ``threshold`` (different total
            size, or the selection does not count ``num_to_prune`` weights).
    """
    _check_chunk_numel(chunk_numel)
    num_weights = sum(weight.numel() for weight in weights)
    if num_weights != threshold.num_weights:
        raise ValueError(
            f"weights have {num_weights} elements but the threshold was found on {threshold.num_weights}. "
            "Pass the same tensors to find_global_threshold and apply_global_threshold_."
        )
    if threshold.num_to_prune == 0:
        return [0] * len(weights)

    threshold_bits = _float32_to_bits(threshold.threshold)
    workspace = _ChunkWorkspace(weights, chunk_numel)
    ties_left = threshold.num_ties_to_prune
    pruned_per_tensor = []
    for weight in weights:
        pruned, ties_left = _prune_tensor_(weight, threshold_bits, ties_left, workspace)
        pruned_per_tensor.append(pruned)

    if sum(pruned_per_tensor) != threshold.num_to_prune:
        raise ValueError(
            f"pruned {sum(pruned_per_tensor)} weights but the threshold selects {threshold.num_to_prune}, "
            "so the weights changed after find_global_threshold. Call find_global_threshold again."
        )
    return pruned_per_tensor


def measure_sparsity(named_weights: Iterable[tuple[str, Tensor]]) -> tuple[int, int, list[dict]]:
    """Count the zeros in each tensor.

    Returns:
        ``(zeros, numel, tensors)``: the totals over all tensors, and one dict per
        tensor with the keys ``name``, ``shape`` (a list), ``numel``, ``zeros``
        and ``sparsity`` (zeros / numel, 0.0 for an empty tensor).
    """
    tensors = []
    for name, weight in named_weights:
        zeros = _count_zeros(weight)
        numel = weight.numel()
        tensors.append(
            {
                "name": name,
                "shape": list(weight.shape),
                "numel": numel,
                "zeros": zeros,
                "sparsity": zeros / numel if numel else 0.0,
            }
        )
    total_zeros = sum(entry["zeros"] for entry in tensors)
    total_numel = sum(entry["numel"] for entry in tensors)
    return total_zeros, total_numel, tensors


def prune_model(
    model: nn.Module,
    method: str,
    sparsity: float,
    include_embeddings: bool = True,
    *,
    seed: int = 0,
    windows: Tensor | None = None,
    settings=None,
) -> PruningReport:
    """Prune ``model`` in place with ``method`` at ``sparsity`` and report what was done.

    ``method`` is one of :data:`PRUNING_METHODS`:

    - ``"magnitude"``: global unstructured L1 pruning; the ``round(sparsity * N)``
      weights with the smallest ``|w|`` over all ``N`` prunable weights become zero.
    - ``"magnitude-layer"``: the same with ``round(sparsity * n)`` weights in each matrix
      of ``n`` weights.
    - ``"random"``: ``round(sparsity * n)`` uniformly random weights in each matrix, drawn
      from a generator seeded with ``seed``.
    - the layer-wise methods (Wanda, SparseGPT, N:M patterns, ``structured-ffn``), which
      act on the transformer layers only; see :func:`lmprune.calibration.prune_layers`.
      Calibrated ones need ``windows`` (token ids, shape [samples, seq_length]);
      ``settings`` is a :class:`lmprune.calibration.CalibrationSettings`.

    At sparsity 0 no weight changes, whatever the method. An N:M method accepts only
    sparsity 0 and the sparsity its pattern sets (0.5 for 2:4). Pruned values are written
    into the parameters, so no masks or forward hooks are added and the model saves like
    any dense model.

    Raises:
        ValueError: for an unknown ``method``, a ``sparsity`` outside ``[0, 1)`` or not the
            one an N:M pattern sets, or NaN weights.
        TypeError: for prunable weights that are not float32, float16 or bfloat16.
    """
    spec = method_spec(method)
    _check_sparsity(sparsity)
    if spec.fixed_sparsity is not None and sparsity not in (0, spec.fixed_sparsity):
        raise ValueError(
            f"method {method} keeps {spec.kept} of every {spec.group} weights, which is sparsity "
            f"{spec.fixed_sparsity:g}, not {sparsity:g}. Use sparsity {spec.fixed_sparsity:g} (label "
            f"s{100 * spec.fixed_sparsity:g}) with {method}."
        )

    if spec.base == "magnitude" and spec.group is None:
        report = _prune_magnitude(model, sparsity, include_embeddings)
    elif sparsity == 0:
        report = _report(method, sparsity, prunable_weights(model, include_embeddings), "prunable", num_pruned=0)
    elif spec.layerwise:
        report = _prune_layers(model, spec, sparsity, windows, settings)
    else:
        report = _prune_per_matrix(model, spec.base, sparsity, include_embeddings, seed)
    zeros, numel, _ = measure_sparsity(prunable_weights(model, include_embeddings))
    report.model_sparsity = zeros / numel if numel else 0.0
    return report


def _report(method, sparsity, named_weights, scope, *, num_pruned=None, zeros_before=0, threshold=None) -> PruningReport:
    """Measure ``named_weights`` after pruning; ``num_pruned`` defaults to the zeros added since ``zeros_before``."""
    zeros, numel, tensors = measure_sparsity(named_weights)
    if num_pruned is None:
        num_pruned = zeros - zeros_before
    return PruningReport(
        method=method,
        sparsity_target=float(sparsity),
        threshold=threshold,
        num_weights=numel,
        num_pruned=num_pruned,
        sparsity_achieved=zeros / numel if numel else 0.0,
        scope=scope,
        tensors=tensors,
    )


def _prune_magnitude(model: nn.Module, sparsity: float, include_embeddings: bool) -> PruningReport:
    named_weights = prunable_weights(model, include_embeddings)
    names = [name for name, _ in named_weights]
    weights = [param for _, param in named_weights]

    threshold = find_global_threshold(weights, sparsity, names=names)
    pruned_per_tensor = apply_global_threshold_(weights, threshold)
    return _report("magnitude", sparsity, named_weights, "prunable", num_pruned=sum(pruned_per_tensor), threshold=threshold.threshold)


@torch.no_grad()
def _prune_per_matrix(model: nn.Module, base: str, sparsity: float, include_embeddings: bool, seed: int) -> PruningReport:
    """Prune every prunable matrix to the same sparsity, by magnitude (magnitude-layer) or at random."""
    named_weights = prunable_weights(model, include_embeddings)
    zeros_before = measure_sparsity(named_weights)[0]
    generator = torch.Generator().manual_seed(seed)
    for name, weight in named_weights:
        _check_dtype(name, weight)
        if base == "random":
            mask = masks.random_mask(weight.shape, sparsity, generator).to(weight.device)
        else:
            mask = masks.lowest_mask(weight.detach().abs().float(), sparsity)
        weight.masked_fill_(mask, 0)
    report = _report(base, sparsity, named_weights, "prunable", zeros_before=zeros_before)
    report.details = {"seed": seed} if base == "random" else {}
    return report


def _prune_layers(model: nn.Module, spec, sparsity: float, windows: Tensor | None, settings) -> PruningReport:
    """Prune with a layer-wise method: Wanda, SparseGPT, N:M or structured-ffn."""
    from lmprune import calibration

    settings = settings or calibration.CalibrationSettings()

    def layer_weights():
        return [
            (f"{stack_name}.{index}.{name}.weight", module.weight)
            for stack_name, stack in calibration.layer_stacks(model)
            for index, layer in enumerate(stack)
            for name, module in calibration.layer_linears(layer)
        ]

    zeros_before = measure_sparsity(layer_weights())[0]
    ffn_weights_before = _ffn_weights(model) if spec.structured else 0
    details = calibration.prune_layers(model, spec, sparsity, windows, settings)
    report = _report(spec.name, sparsity, layer_weights(), "layers", zeros_before=zeros_before)
    if spec.structured:
        # Removed, not zeroed: the share of the FFN weights that are gone.
        report.scope = "ffn"
        report.num_weights = ffn_weights_before
        report.num_pruned = ffn_weights_before - _ffn_weights(model)
        report.sparsity_achieved = report.num_pruned / ffn_weights_before
    report.details = details
    return report


def _ffn_weights(model: nn.Module) -> int:
    from lmprune.structured import ffn_blocks

    return sum(block.up.weight.numel() + block.down.weight.numel() for block in ffn_blocks(model))


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if math.isnan(sparsity) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def _check_chunk_numel(chunk_numel: int) -> None:
    if not isinstance(chunk_numel, numbers.Integral) or chunk_numel < 1:
        raise ValueError(f"chunk_numel must be a positive integer, got {chunk_numel!r}")


def _check_dtype(name: str, weight: Tensor) -> None:
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"weight tensor {name!r} has unsupported dtype {weight.dtype}. Magnitude pruning supports "
            "float32, float16 and bfloat16, whose values convert to float32 exactly."
        )


def _tensor_names(weights: Sequence[Tensor], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"weights[{index}]" for index in range(len(weights))]
    if len(names) != len(weights):
        raise ValueError(f"got {len(names)} names for {len(weights)} weight tensors")
    return list(names)


class _ChunkWorkspace:
    """Buffers for one chunk, reused across chunks so that no pass allocates per chunk."""

    def __init__(self, weights: Sequence[Tensor], chunk_numel: int):
        self.chunk_numel = chunk_numel
        self.size = min(chunk_numel, max((weight.numel() for weight in weights), default=0))
        self.device: torch.device | None = None

    def abs_bits(self, chunk: Tensor) -> Tensor:
        """Write the float32 bit patterns of ``|chunk|`` into the int32 buffer and return that view."""
        self._allocate(chunk.device)
        bits = self.bits[: chunk.numel()]
        if chunk.dtype == torch.float32:
            torch.bitwise_and(chunk.view(torch.int32), _ABS_MASK, out=bits)
        else:
            # Upcasting float16 and bfloat16 to float32 is exact.
            bits.view(torch.float32).copy_(chunk)
            bits.bitwise_and_(_ABS_MASK)
        return bits

    def masks(self, numel: int) -> tuple[Tensor, Tensor]:
        """Return two bool buffers of ``numel`` elements on the current device."""
        return self.prune_mask[:numel], self.tie_mask[:numel]

    def _allocate(self, device: torch.device) -> None:
        if device == self.device:
            return
        self.bits = torch.empty(self.size, dtype=torch.int32, device=device)
        self.prune_mask = torch.empty(self.size, dtype=torch.bool, device=device)
        self.tie_mask = torch.empty(self.size, dtype=torch.bool, device=device)
        self.device = device


def _flat_chunks(weight: Tensor, chunk_numel: int):
    """Yield consecutive views of ``weight.view(-1)`` with at most ``chunk_numel`` elements."""
    flat = weight.detach().view(-1)
    for start in range(0, flat.numel(), chunk_numel):
        yield flat[start : start + chunk_numel]


def _contiguous(weight: Tensor) -> Tensor:
    # NOTE: a non-contiguous tensor is copied whole here, so its temporaries are
    # not bounded by chunk_numel. Model parameters are contiguous in practice.
    return weight if weight.is_contiguous() else weight.contiguous()


def _histogram_high_bits(weights: Sequence[Tensor], names: Sequence[str], workspace: _ChunkWorkspace) -> Tensor:
    """Count ``|w|`` by the high 16 bits of its float32 pattern, raising ValueError on NaN."""
    histogram = torch.zeros(_NUM_BINS, dtype=torch.int64)
    for name, weight in zip(names, weights):
        for chunk in _flat_chunks(_contiguous(weight), workspace.chunk_numel):
            bits = workspace.abs_bits(chunk)
            if bits.max().item() > _INF_BITS:
                raise ValueError(f"weight tensor {name!r} contains NaN, which has no magnitude order. Fix the weights first.")
            bits.bitwise_right_shift_(_HALF_BITS)
            histogram += torch.bincount(bits, minlength=_NUM_BINS).cpu()
    return histogram


def _histogram_low_bits(weights: Sequence[Tensor], bucket_start: int, workspace: _ChunkWorkspace) -> Tensor:
    """Count the ``|w|`` patterns in ``[bucket_start, bucket_start + 65536)`` by their low 16 bits."""
    histogram = torch.zeros(_NUM_BINS, dtype=torch.int64)
    for weight in weights:
        for chunk in _flat_chunks(_contiguous(weight), workspace.chunk_numel):
            bits = workspace.abs_bits(chunk)
            # Shift the bucket to bins 1..65536 and clamp everything else into
            # bins 0 and 65537, which avoids a boolean mask and a gather.
            bits.sub_(bucket_start - 1)
            bits.clamp_(0, _NUM_BINS + 1)
            histogram += torch.bincount(bits, minlength=_NUM_BINS + 2)[1 : _NUM_BINS + 1].cpu()
    return histogram


def _select_bin(histogram: Tensor, rank: int) -> tuple[int, int]:
    """Return the bin holding the ``rank``-th smallest value (from 1) and the count in lower bins."""
    cumulative = torch.cumsum(histogram, dim=0)
    index = int(torch.searchsorted(cumulative, rank).item())
    below = int(cumulative[index - 1].item()) if index > 0 else 0
    return index, below


def _prune_tensor_(weight: Tensor, threshold_bits: int, ties_left: int, workspace: _ChunkWorkspace) -> tuple[int, int]:
    """Zero one tensor's selected weights in place and return (number selected, ties still to prune)."""
    target = _contiguous(weight.detach())  # a copy only if weight is not contiguous
    pruned = 0
    for chunk in _flat_chunks(target, workspace.chunk_numel):
        bits = workspace.abs_bits(chunk)
        to_prune, ties = workspace.masks(chunk.numel())
        torch.lt(bits, threshold_bits, out=to_prune)
        if ties_left > 0:
            torch.eq(bits, threshold_bits, out=ties)
            ties_left -= _keep_first_ties_(ties, ties_left, rank_buffer=bits)
            to_prune |= ties
        pruned += int(torch.count_nonzero(to_prune).item())
        chunk.masked_fill_(to_prune, 0)
    if not weight.is_contiguous():
        weight.detach().copy_(target)
    return pruned, ties_left


def _keep_first_ties_(ties: Tensor, limit: int, rank_buffer: Tensor) -> int:
    """Clear all but the first ``limit`` True entries of ``ties`` in place and return how many remain.

    ``rank_buffer`` is an int32 tensor of the same length that is overwritten.
    """
    num_ties = int(torch.count_nonzero(ties).item())
    if num_ties <= limit:
        return num_ties
    # The running count of ties is non-decreasing, so the limit-th tie is the
    # first index where it reaches limit.
    torch.cumsum(ties, dim=0, dtype=torch.int32, out=rank_buffer)
    last = int(torch.searchsorted(rank_buffer, limit).item())
    ties[last + 1 :] = False
    return limit


def _count_zeros(weight: Tensor) -> int:
    return weight.numel() - int(torch.count_nonzero(weight).item())


def _float32_to_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _bits_to_float32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]
