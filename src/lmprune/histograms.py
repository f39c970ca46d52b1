"""Weight-value histograms of a whole model and of each transformer layer, and their figures.

Counts are computed tensor by tensor with ``torch.bincount`` into exact int64 counts, so
the weights of a model are never concatenated, and values outside the histogram range
are counted as underflow and overflow instead of being dropped silently. Every histogram
of one :class:`WeightHistograms` uses the same bin edges, so layers can be compared bin by
bin with each other and with the whole model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure

from lmprune.plots import save_figure

# Odd, so that one bin is centred on zero when the range is symmetric and the exact zeros
# of a pruned tensor never sit on a bin edge.
DEFAULT_BINS = 201

STACKS = ("encoder", "decoder")

# Elements per bincount step. Each float64 or int64 temporary of a step is then 32 MiB,
# however large the tensor (GPT-2 XL's 50257 x 1600 embedding has 80 M values).
_CHUNK_ELEMENTS = 2**22

# (pattern, stack) pairs. A stack of None means the first group of the pattern is the stack.
_LAYER_PATTERNS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    # GPT-2: transformer.h.{i}. in GPT2LMHeadModel, h.{i}. in GPT2Model.
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\."), "decoder"),
    # BERT family: bert.encoder.layer.{i}. in BertForMaskedLM, encoder.layer.{i}. in BertModel.
    (re.compile(r"^(?:[A-Za-z_]\w*\.)?encoder\.layer\.(\d+)\."), "encoder"),
    # BART: model.{encoder,decoder}.layers.{i}. in BartForConditionalGeneration and
    # {encoder,decoder}.layers.{i}. in BartModel.
    (re.compile(r"^(?:model\.)?(encoder|decoder)\.layers\.(\d+)\."), None),
)

LayerKey = tuple[str, int]


def layer_of(name: str) -> LayerKey | None:
    """Map a parameter name to its transformer layer as ``(stack, layer index)``.

    The stack is ``"decoder"`` for GPT-2 blocks (``transformer.h.{i}.``), ``"encoder"``
    for BERT layers (``bert.encoder.layer.{i}.`` or ``encoder.layer.{i}.``) and the
    name's own stack for BART (``model.encoder.layers.{i}.``,
    ``model.decoder.layers.{i}.``). Returns ``None`` for parameters outside the layers,
    such as embeddings, final layer norms, the LM head and the pooler.
    """
    for pattern, stack in _LAYER_PATTERNS:
        match = pattern.match(name)
        if match is None:
            continue
        if stack is None:
            return match.group(1), int(match.group(2))
        return stack, int(match.group(1))
    return None


@dataclasses.dataclass(eq=False)
class HistogramCounts:
    """Histogram counts of a group of tensors, with element and zero counts.

    ``counts`` is an int64 array with one count per bin. Values below the first edge are
    counted in ``underflow`` and values above the last edge in ``overflow``, not in
    ``counts``, so ``counts.sum() + underflow + overflow == numel``. The last bin
    includes the last edge. ``zeros`` counts the values exactly equal to 0.
    """

    counts: np.ndarray
    numel: int = 0
    zeros: int = 0
    underflow: int = 0
    overflow: int = 0
    tensors: int = 0

    @classmethod
    def empty(cls, bins: int) -> HistogramCounts:
        """Return all-zero counts for ``bins`` bins."""
        return cls(counts=np.zeros(bins, dtype=np.int64))

    def add(self, other: HistogramCounts) -> None:
        """Add the counts of ``other`` to this object in place."""
        self.counts += other.counts
        self.numel += other.numel
        self.zeros += other.zeros
        self.underflow += other.underflow
        self.overflow += other.overflow
        self.tensors += other.tensors

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HistogramCounts):
            return NotImplemented
        fields = ("numel", "zeros", "underflow", "overflow", "tensors")
        return np.array_equal(self.counts, other.counts) and all(
            getattr(self, name) == getattr(other, name) for name in fields
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict, with ``counts`` as a list of ints."""
        return {
            "counts": self.counts.tolist(),
            "numel": self.numel,
            "zeros": self.zeros,
            "underflow": self.underflow,
            "overflow": self.overflow,
            "tensors": self.tensors,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistogramCounts:
        """Rebuild counts from the output of :meth:`to_dict`."""
        names = ("numel", "zeros", "underflow", "overflow", "tensors")
        fields = {name: int(data[name]) for name in names}
        return cls(counts=np.asarray(data["counts"], dtype=np.int64), **fields)


@dataclasses.dataclass
class WeightHistograms:
    """Histograms of a model's weights, over the whole model and per transformer layer.

    ``bin_edges`` is a float64 array of shape ``(bins + 1,)`` shared by all histograms.
    ``model`` covers every tensor passed in. ``layers`` maps ``(stack, layer index)`` to
    the tensors of that layer, in the order encoder then decoder and by index.
    ``outside_layers`` covers the tensors for which :func:`layer_of` returns ``None``.
    """

    bin_edges: np.ndarray
    model: HistogramCounts
    outside_layers: HistogramCounts
    layers: dict[LayerKey, HistogramCounts]

    @property
    def bins(self) -> int:
        return len(self.bin_edges) - 1

    @property
    def value_range(self) -> tuple[float, float]:
        return float(self.bin_edges[0]), float(self.bin_edges[-1])

    @property
    def stacks(self) -> list[str]:
        """The stacks that have at least one layer, in ``STACKS`` order."""
        present = {stack for stack, _ in self.layers}
        return [stack for stack in STACKS if stack in present]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, which :meth:`from_dict` turns back into this object."""
        return {
            "bins": self.bins,
            "value_range": list(self.value_range),
            "bin_edges": self.bin_edges.tolist(),
            "model": self.model.to_dict(),
            "outside_layers": self.outside_layers.to_dict(),
            "layers": [
                {"stack": stack, "index": index} | counts.to_dict()
                for (stack, index), counts in self.layers.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightHistograms:
        """Rebuild histograms from the output of :meth:`to_dict`."""
        layers = {
            (layer["stack"], int(layer["index"])): HistogramCounts.from_dict(layer)
            for layer in data["layers"]
        }
        return cls(
            bin_edges=np.asarray(data["bin_edges"], dtype=np.float64),
            model=HistogramCounts.from_dict(data["model"]),
            outside_layers=HistogramCounts.from_dict(data["outside_layers"]),
            layers=layers,
        )


def _check_finite_max_abs(name: str, tensor: torch.Tensor) -> float:
    """Return max |value| of ``tensor`` (0.0 when empty), or raise for NaN or infinity."""
    if tensor.numel() == 0:
        return 0.0
    max_abs = float(tensor.detach().abs().max())
    if not math.isfinite(max_abs):
        bad = int((~torch.isfinite(tensor.detach())).sum())
        raise ValueError(f"tensor {name!r} contains {bad} NaN or infinite values")
    return max_abs


def _symmetric_range(named_weights: Sequence[tuple[str, torch.Tensor]]) -> tuple[float, float]:
    """Return ``(-m, m)`` with m the max |value| over all tensors."""
    max_abs = max((_check_finite_max_abs(name, t) for name, t in named_weights), default=0.0)
    if max_abs == 0.0:
        # NOTE: all weights are zero or no tensor was passed, so any range contains them.
        # (-1, 1) keeps the edges valid and puts every value in the centre bin.
        return -1.0, 1.0
    return -max_abs, max_abs


def _validate_histogram_arguments(bins: int, value_range: tuple[float, float] | None) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"invalid bins {bins!r}: expected a positive integer")
    if value_range is None:
        return
    low, high = value_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"invalid value_range {value_range!r}: expected finite (low, high) with low < high"
        )


def _tensor_histogram(
    name: str, tensor: torch.Tensor, low: float, high: float, bins: int
) -> HistogramCounts:
    """Histogram one tensor on ``bins`` equal bins from ``low`` to ``high``.

    Works on the tensor's own device, in chunks of ``_CHUNK_ELEMENTS`` values converted to
    float64, so that bin positions are exact enough for float32 and bfloat16 weights.
    Raises ``ValueError`` when the tensor contains NaN or infinity.
    """
    # NOTE: the tests run on CPU tensors only. CUDA tensors use the same torch ops but
    # have not been tested here.
    flat = tensor.detach().reshape(-1)
    counts = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    scale = bins / (high - low)
    zeros = underflow = overflow = 0

    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        chunk = flat[start : start + _CHUNK_ELEMENTS].to(torch.float64)
        finite = torch.isfinite(chunk)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"tensor {name!r} contains {bad} NaN or infinite values")

        below = chunk < low
        above = chunk > high
        zeros += int((chunk == 0).sum())
        underflow += int(below.sum())
        overflow += int(above.sum())

        inside = chunk[~(below | above)]
        # floor((x - low) * scale) is the bin index. x == high gives index ``bins``,
        # which the clamp puts into the last bin.
        index = ((inside - low) * scale).floor_().to(torch.int64).clamp_(0, bins - 1)
        counts += torch.bincount(index, minlength=bins)

    return HistogramCounts(
        counts=counts.cpu().numpy().astype(np.int64),
        numel=flat.numel(),
        zeros=zeros,
        underflow=underflow,
        overflow=overflow,
        tensors=1,
    )


def _layer_sort_key(key: LayerKey) -> tuple[int, int]:
    stack, index = key
    return STACKS.index(stack), index


def weight_histograms(
    named_weights: Iterable[tuple[str, torch.Tensor]],
    bins: int = DEFAULT_BINS,
    value_range: tuple[float, float] | None = None,
) -> WeightHistograms:
    """Histogram weights over the whole model and per transformer layer, on shared bins.

    ``named_weights`` contains ``(parameter name, tensor)`` pairs, for example the prunable
    weights of ``model.named_parameters()``. It is read twice when ``value_range`` is
    ``None``, so an iterator is first turned into a list (the list keeps references to
    the tensors, not copies). With ``value_range=None`` the range is ``(-m, m)`` with m
    the max |w| over all tensors. Tensors are grouped by :func:`layer_of`, and the tensors
    outside the layers count in ``model`` and ``outside_layers`` only. The input tensors
    are not modified.

    Raises ``ValueError`` for ``bins`` below 1, an empty or reversed ``value_range``, or a
    tensor that contains NaN or infinity.
    """
    _validate_histogram_arguments(bins, value_range)
    named_weights = list(named_weights)
    low, high = value_range if value_range is not None else _symmetric_range(named_weights)

    model = HistogramCounts.empty(bins)
    outside_layers = HistogramCounts.empty(bins)
    layers: dict[LayerKey, HistogramCounts] = {}
    for name, tensor in named_weights:
        tensor_counts = _tensor_histogram(name, tensor, low, high, bins)
        model.add(tensor_counts)

        key = layer_of(name)
        if key is None:
            outside_layers.add(tensor_counts)
        else:
            layers.setdefault(key, HistogramCounts.empty(bins)).add(tensor_counts)

    return WeightHistograms(
        bin_edges=np.linspace(low, high, bins + 1, dtype=np.float64),
        model=model,
        outside_layers=outside_layers,
        layers={key: layers[key] for key in sorted(layers, key=_layer_sort_key)},
    )


class LayerGrid(NamedTuple):
    """Panel layout of :func:`plot_layer_histograms`: grid shape and panel per layer."""

    rows: int
    columns: int
    positions: dict[LayerKey, tuple[int, int]]


def _grid_columns(layer_count: int) -> int:
    """Return 6 columns up to 36 layers and about sqrt(n) beyond, so the grid stays near square."""
    return min(layer_count, max(6, math.ceil(math.sqrt(layer_count))))


def layer_grid(layer_keys: Iterable[LayerKey]) -> LayerGrid:
    """Lay out one panel per layer: each stack on its own rows, layers in index order.

    All stacks use the column count of the deepest one, so that a 12-layer stack fills
    2 rows of 6 and a 24-layer stack fills 4 rows of 6.
    """
    by_stack: dict[str, list[int]] = {}
    for stack, index in sorted(layer_keys, key=_layer_sort_key):
        by_stack.setdefault(stack, []).append(index)
    if not by_stack:
        return LayerGrid(rows=0, columns=0, positions={})

    columns = max(_grid_columns(len(indices)) for indices in by_stack.values())
    positions = {}
    first_row = 0
    for stack, indices in by_stack.items():
        for slot, index in enumerate(indices):
            positions[(stack, index)] = (first_row + slot // columns, slot % columns)
        first_row += math.ceil(len(indices) / columns)
    return LayerGrid(rows=first_row, columns=columns, positions=positions)


def _percent_zero(counts: HistogramCounts) -> float:
    return 100.0 * counts.zeros / counts.numel if counts.numel else 0.0


def _range_note(counts: HistogramCounts) -> str:
    """Return a note on values outside the histogram range, or "" when there are none."""
    if counts.underflow == 0 and counts.overflow == 0:
        return ""
    return f"\noutside range: {counts.underflow:,} below, {counts.overflow:,} above"


def plot_model_histogram(h: WeightHistograms, path: str | os.PathLike[str], title: str) -> None:
    """Plot the whole-model histogram with log-scale counts and save it to ``path``.

    The log scale shows both the spike of pruned weights in the bin at zero and the
    tails. ``title`` should name the model and sparsity. The file is written atomically,
    and the format comes from the suffix of ``path``.
    """
    low, high = h.value_range
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.stairs(h.model.counts, h.bin_edges, fill=True, color="C0", alpha=0.3)
    ax.stairs(h.model.counts, h.bin_edges, color="C0", linewidth=1.0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    ax.set_xlim(low, high)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log scale)")
    ax.grid(True, which="major", alpha=0.3)

    summary = (
        f"{h.model.numel:,} weights in {h.model.tensors} tensors\n"
        f"{h.model.zeros:,} exactly zero ({_percent_zero(h.model):.1f}%)\n"
        f"{h.bins} bins from {low:.3g} to {high:.3g}" + _range_note(h.model)
    )
    ax.text(
        0.99, 0.97, summary, transform=ax.transAxes, ha="right", va="top", fontsize="small",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )
    ax.set_title(title)
    save_figure(figure, path)


def _draw_layer_panel(ax: Any, h: WeightHistograms, key: LayerKey) -> None:
    """Draw one layer's histogram over the whole-model histogram scaled to its count."""
    counts = h.layers[key]
    model_in_range = h.model.counts.sum()
    scale = counts.counts.sum() / model_in_range if model_in_range else 0.0
    ax.stairs(h.model.counts * scale, h.bin_edges, fill=True, color="0.6", alpha=0.45)
    ax.stairs(counts.counts, h.bin_edges, color="C0", linewidth=0.9)
    stack, index = key
    ax.set_title(f"{stack} {index}", fontsize="small", pad=2)
    ax.text(
        0.98, 0.95, f"{_percent_zero(counts):.1f}% zero", transform=ax.transAxes,
        ha="right", va="top", fontsize="x-small",
    )


def plot_layer_histograms(h: WeightHistograms, path: str | os.PathLike[str], title: str) -> None:
    """Plot one histogram panel per transformer layer and save the grid to ``path``.

    Panels are laid out by :func:`layer_grid`, each stack on its own rows, with shared
    bins, shared axes and log-scale counts. Behind each layer the whole-model histogram,
    scaled to the layer's count, is drawn in grey, so a layer whose shape drifts from the
    model's shows. Weights outside the layers (embeddings, LM head) are in that grey
    histogram only, which the figure's caption states. ``title`` should name the model and
    sparsity. The file is written atomically, with the format from the suffix of ``path``.

    Raises ``ValueError`` when no tensor was assigned to a layer.
    """
    if not h.layers:
        raise ValueError(
            "no weight histogram per layer to plot: no parameter name matched a GPT-2, "
            "BERT or BART transformer layer"
        )

    grid = layer_grid(h.layers)
    figure = Figure(figsize=(2.3 * grid.columns, 1.7 * grid.rows + 1.3), layout="constrained")
    axes = figure.subplots(grid.rows, grid.columns, sharex=True, sharey=True, squeeze=False)
    used = set(grid.positions.values())
    for row in range(grid.rows):
        for column in range(grid.columns):
            if (row, column) not in used:
                axes[row, column].set_visible(False)

    for key, (row, column) in grid.positions.items():
        ax = axes[row, column]
        _draw_layer_panel(ax, h, key)
        # Show x tick labels on every panel that has no visible panel below it.
        ax.tick_params(labelbottom=(row + 1, column) not in used, labelsize="x-small")

    first = axes[0, 0]
    first.set_yscale("log")
    first.set_ylim(bottom=0.8)
    first.set_xlim(*h.value_range)

    low, high = h.value_range
    caption = (
        f"One panel per transformer layer: {h.bins} bins from {low:.3g} to {high:.3g}, "
        "log-scale counts. Grey: whole-model histogram scaled to the layer's weight count."
    )
    if h.outside_layers.numel:
        caption += (
            f"\nWeights outside the layers (embeddings, LM head and others, "
            f"{h.outside_layers.numel:,} values) are only in the grey whole-model histogram."
        )
    figure.suptitle(f"{title}\n{caption}", fontsize="medium")
    figure.supxlabel("weight value", fontsize="small")
    figure.supylabel("count (log scale)", fontsize="small")
    save_figure(figure, path)
