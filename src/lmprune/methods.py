"""The pruning methods lmprune offers, and the inputs each one needs.

A method name is what appears in every output path (``results/checkpoints/{model}/{method}/...``).
It is a base method, optionally followed by an N:M suffix: ``wanda-2of4`` is Wanda keeping 2 of
every 4 consecutive weights of a row. :func:`method_spec` turns a name into a :class:`MethodSpec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["METHOD_NAMES", "MethodSpec", "method_spec", "method_sparsities"]

# Base methods and whether each one measures activations on calibration text.
_BASES = {
    "magnitude": False,
    "magnitude-layer": False,
    "random": False,
    "wanda": True,
    "sparsegpt": True,
    "structured-ffn": True,
}
# The N:M patterns offered, as (kept, group size); the bases that accept them.
N_M_PATTERNS = ((2, 4), (4, 8))
_N_M_BASES = ("magnitude", "wanda", "sparsegpt")

METHOD_NAMES = (
    tuple(base for base in _BASES if base != "structured-ffn")
    + tuple(f"{base}-{kept}of{group}" for base in _N_M_BASES for kept, group in N_M_PATTERNS)
    + ("structured-ffn",)
)

_N_M_SUFFIX = re.compile(r"^(?P<base>.+)-(?P<kept>\d+)of(?P<group>\d+)$")


@dataclass(frozen=True)
class MethodSpec:
    """The pruning settings that one method name selects.

    Attributes:
        name: the name as written in paths and the config.
        base: ``magnitude``, ``magnitude-layer``, ``random``, ``wanda``, ``sparsegpt`` or
            ``structured-ffn``.
        kept, group: the N:M pattern (``kept`` non-zeros in every ``group`` consecutive weights of
            a row), or None for unstructured and structured methods.
        calibrated: True when the method runs calibration text through the model.
        layerwise: True when the method acts on the Linear (and GPT-2 Conv1D) weights inside the
            transformer layers only, one layer at a time; embeddings, poolers and heads stay dense.
            False for the methods that act on every prunable weight (see
            :func:`lmprune.pruning.prunable_weights`).
        structured: True when whole FFN neurons are removed and the model gets smaller.
    """

    name: str
    base: str
    kept: int | None = None
    group: int | None = None
    calibrated: bool = False
    layerwise: bool = False
    structured: bool = False

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``1 - kept / group``), or None for other methods."""
        if self.group is None:
            return None
        return 1.0 - self.kept / self.group


def method_spec(name: str) -> MethodSpec:
    """Parse a method name such as ``magnitude``, ``wanda`` or ``sparsegpt-2of4``.

    Raises:
        ValueError: for a name that is not in :data:`METHOD_NAMES`, listing the valid names.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown pruning method {name!r}. Valid methods: {', '.join(METHOD_NAMES)}")
    kept = group = None
    base = name
    match = _N_M_SUFFIX.match(name)
    if match:
        base, kept, group = match["base"], int(match["kept"]), int(match["group"])
    return MethodSpec(
        name=name,
        base=base,
        kept=kept,
        group=group,
        calibrated=_BASES[base],
        layerwise=base in ("wanda", "sparsegpt", "structured-ffn") or group is not None,
        structured=base == "structured-ffn",
    )


def method_sparsities(methods: list[str], sparsities: list[float]) -> list[tuple[str, float]]:
    """Return the (method, sparsity) pairs a run prunes, in config order.

    Sparsity 0 is the dense model whatever the method, so it is pruned once, under the first
    method. An N:M method runs only at the sparsity its pattern implies (0.5 for 2:4 and 4:8),
    whether or not the ladder contains that value. Every other method runs at every non-zero
    sparsity of the ladder.
    """
    pairs = []
    for index, name in enumerate(methods):
        spec = method_spec(name)
        if spec.fixed_sparsity is not None:
            levels = [spec.fixed_sparsity]
        else:
            levels = [sparsity for sparsity in sparsities if sparsity != 0]
        if index == 0 and 0 in sparsities:
            levels = [0.0] + levels
        pairs += [(name, sparsity) for sparsity in levels]
    return pairs
