"""Pruning masks and weight updates for one linear layer at a time.

Every weight is in ``nn.Linear`` orientation, shape ``(out_features, in_features)``, so
callers transpose GPT-2's ``Conv1D`` weights first. A mask is a bool tensor of the
weight's shape in which True marks a pruned weight, one that is set to zero.

Counts are exact: a sparsity ``s`` over ``n`` candidates prunes ``round(s * n)`` of
them, with Python's ``round`` as in :mod:`lmprune.pruning`. Among equal scores the
lower flattened (row-major) index is pruned first, so every mask is deterministic.
SparseGPT is the exception to the total count because it counts per column block.

The module provides magnitude-style masks (:func:`lowest_mask`,
:func:`row_lowest_mask`, :func:`n_m_mask`), :func:`random_mask`, Wanda's scores
(:func:`wanda_scores`, Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models"), the input statistics that Wanda and SparseGPT measure on
calibration text (:class:`InputStatistics`), and SparseGPT itself
(:func:`sparsegpt_prune_`, Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot").
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "InputStatistics",
    "lowest_mask",
    "n_m_mask",
    "random_mask",
    "row_lowest_mask",
    "sparsegpt_prune_",
    "wanda_scores",
]


def lowest_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Return a mask that prunes the ``round(sparsity * scores.numel())`` lowest scores.

    Args:
        scores: tensor of any shape and floating dtype, on any device.
        sparsity: fraction to prune, in ``[0, 1)``.

    Returns:
        Bool tensor of the shape and device of ``scores``, True where pruned.

    Raises:
        ValueError: for a ``sparsity`` outside ``[0, 1)`` or NaN scores.
    """
    _check_sparsity(sparsity)
    _check_no_nan(scores, "scores")
    return _lowest_flat(scores, round(sparsity * scores.numel()))


def row_lowest_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Return a mask that prunes the ``round(sparsity * in_features)`` lowest scores of each row.

    This is Wanda's comparison group: each output row loses the same number of weights.

    Args:
        scores: tensor of shape ``(out_features, in_features)``.
        sparsity: fraction of each row to prune, in ``[0, 1)``.

    Returns:
        Bool tensor of the shape and device of ``scores``, True where pruned.

    Raises:
        ValueError: for scores that are not 2-D, a ``sparsity`` outside ``[0, 1)`` or NaN
            scores.
    """
    _check_sparsity(sparsity)
    _check_matrix(scores, "scores")
    _check_no_nan(scores, "scores")
    return _lowest_along_last_dim(scores, round(sparsity * scores.shape[1]))


def n_m_mask(scores: Tensor, kept: int, group: int) -> Tensor:
    """Return an N:M mask that keeps the ``kept`` highest scores of each group of columns.

    Each row is split into runs of ``group`` consecutive columns (``0 .. group-1``,
    ``group .. 2*group-1`` and so on). In each run the ``group - kept`` lowest scores are
    pruned, so 2:4 is ``kept=2, group=4``.

    Args:
        scores: tensor of shape ``(out_features, in_features)``, with ``in_features``
            divisible by ``group``.
        kept: weights kept per group, in ``1 .. group-1``.
        group: number of consecutive columns per group.

    Returns:
        Bool tensor of the shape and device of ``scores``, True where pruned.

    Raises:
        ValueError: for scores that are not 2-D, a ``kept`` or ``group`` out of range, an
            ``in_features`` that ``group`` does not divide, or NaN scores.
    """
    _check_matrix(scores, "scores")
    _check_n_m(kept, group)
    _check_group_divides(scores.shape[1], group)
    _check_no_nan(scores, "scores")

    rows, columns = scores.shape
    grouped = scores.reshape(rows, columns // group, group)
    return _lowest_along_last_dim(grouped, group - kept).reshape(rows, columns)


def random_mask(shape: Sequence[int], sparsity: float, generator: torch.Generator) -> Tensor:
    """Return a mask with exactly ``round(sparsity * numel)`` True entries at random positions.

    Every set of that many positions is equally likely. The same ``generator`` state
    gives the same mask, and the generator's state advances.

    Args:
        shape: shape of the mask.
        sparsity: fraction to prune, in ``[0, 1)``.
        generator: source of randomness. The mask is created on its device.

    Raises:
        ValueError: for a ``sparsity`` outside ``[0, 1)`` or a negative dimension.
        TypeError: if ``generator`` is not a ``torch.Generator``.
    """
    _check_sparsity(sparsity)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}. "
            "Create one with torch.Generator().manual_seed(seed)."
        )
    size = torch.Size(shape)
    if any(dimension < 0 for dimension in size):
        raise ValueError(f"shape must not contain negative dimensions, got {tuple(size)}")

    numel = size.numel()
    pruned_indices = torch.randperm(numel, generator=generator, device=generator.device)[: round(sparsity * numel)]
    mask = torch.zeros(numel, dtype=torch.bool, device=generator.device)
    mask[pruned_indices] = True
    return mask.reshape(size)


def wanda_scores(weight: Tensor, input_norms: Tensor) -> Tensor:
    """Return Wanda's importance scores ``|W| * input_norms[None, :]`` in float32.

    Args:
        weight: tensor of shape ``(out_features, in_features)``.
        input_norms: tensor of shape ``(in_features,)``, the L2 norm of each input feature
            over all calibration tokens (:meth:`InputStatistics.norms`). It is moved to
            the device of ``weight``.

    Returns:
        Float32 tensor of the shape and device of ``weight``.

    Raises:
        ValueError: if ``weight`` is not 2-D or ``input_norms`` does not have one value
            per input feature.
    """
    _check_matrix(weight, "weight")
    in_features = weight.shape[1]
    if input_norms.shape != (in_features,):
        raise ValueError(
            f"input_norms has shape {tuple(input_norms.shape)} but weight {tuple(weight.shape)} has "
            f"{in_features} input features, so input_norms must have shape ({in_features},). Pass the "
            "norms of this layer's inputs and the weight in nn.Linear orientation (transpose a Conv1D weight)."
        )
    norms = input_norms.detach().to(device=weight.device, dtype=torch.float32)
    return weight.detach().abs().float() * norms[None, :]


class InputStatistics:
    """Running sums over the inputs of one linear layer, for Wanda and SparseGPT.

    The sums are the squared value of each input feature and, when ``hessian`` is
    true, the Gram matrix ``X^T X``, where ``X`` stacks every input token as a row.
    Both accumulate in float32.

    NOTE: on CUDA, ``X^T X`` is a float32 matrix product, so it runs in TF32 when the
    caller has enabled TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision``), which lowers its precision.

    Args:
        in_features: size of the last dimension of the inputs.
        hessian: whether to accumulate ``X^T X`` as well, which SparseGPT needs. It takes
            ``4 * in_features**2`` bytes.
        device: where the sums are kept. None means the device of the first inputs.
    """

    def __init__(self, in_features: int, hessian: bool, device: torch.device | str | None = None):
        if isinstance(in_features, bool) or not isinstance(in_features, numbers.Integral) or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        self.in_features = int(in_features)
        self.tracks_hessian = bool(hessian)
        self.tokens = 0
        self._sum_squares: Tensor | None = None
        self._gram: Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))

    @property
    def device(self) -> torch.device | None:
        """Device of the sums, or None before the first inputs when none was given."""
        return None if self._sum_squares is None else self._sum_squares.device

    @torch.no_grad()
    def update(self, inputs: Tensor) -> None:
        """Add a batch of layer inputs to the sums.

        Args:
            inputs: tensor of shape ``(..., in_features)`` and any floating dtype. Every
                index of the leading dimensions is one token. Padding tokens must be
                removed first, because they would count too. The inputs are copied to
                the device of the sums as float32.

        Raises:
            ValueError: if the last dimension is not ``in_features``.
            TypeError: if ``inputs`` is not a floating-point tensor.
        """
        if not inputs.is_floating_point():
            raise TypeError(f"inputs must be a floating-point tensor, got dtype {inputs.dtype}")
        if inputs.dim() == 0 or inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs have shape {tuple(inputs.shape)} but the layer has {self.in_features} input "
                f"features, so the last dimension must be {self.in_features}"
            )
        if self._sum_squares is None:
            self._allocate(inputs.device)

        rows = inputs.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        self._sum_squares += rows.square().sum(dim=0)
        if self._gram is not None:
            self._gram.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    def norms(self) -> Tensor:
        """Return the L2 norm of each input feature over all tokens, shape ``(in_features,)``, float32.

        Raises:
            RuntimeError: if no tokens were added with :meth:`update`.
        """
        self._check_tokens()
        return self._sum_squares.sqrt()

    def hessian(self) -> Tensor:
        """Return ``(2 / tokens) * X^T X``, shape ``(in_features, in_features)``, float32.

        This is the Hessian of the layer's squared reconstruction error with respect to
        one row of the weight, divided by the number of tokens. Each call returns a new
        tensor.

        Raises:
            RuntimeError: if the statistics were created with ``hessian=False`` or no
                tokens were added with :meth:`update`.
        """
        if not self.tracks_hessian:
            raise RuntimeError("these InputStatistics were created with hessian=False. Create them with hessian=True.")
        self._check_tokens()
        return self._gram * (2.0 / self.tokens)

    def _allocate(self, device: torch.device) -> None:
        self._sum_squares = torch.zeros(self.in_features, dtype=torch.float32, device=device)
        if self.tracks_hessian:
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)

    def _check_tokens(self) -> None:
        if self.tokens == 0:
            raise RuntimeError(
                "no input tokens were added to these InputStatistics. Call update() with the layer's "
                "inputs, for example from a forward hook, before reading the statistics."
            )


@torch.no_grad()
def sparsegpt_prune_(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None = None,
    *,
    kept: int | None = None,
    group: int | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> Tensor:
    """Prune one layer with SparseGPT and update its remaining weights, in place.

    SparseGPT (Frantar & Alistarh 2023) prunes the columns from first to last. After
    each column it adds to the later columns the update that minimises the layer's
    squared reconstruction error ``||(W - W_new) X^T||^2`` given the inputs' Hessian.
    Pass either ``sparsity`` (unstructured) or ``kept`` and ``group`` (N:M), not both.

    Unstructured masks are chosen per block of ``block_size`` columns, jointly over all
    rows. Each block prunes the ``round(sparsity * out_features * width)`` weights with
    the lowest ``w**2 / Hinv[j, j]**2``, scored on the weights as updated by the earlier
    blocks. The total pruned count is the sum over blocks, which can differ from
    ``round(sparsity * weight.numel())`` by up to half the number of blocks. With an
    identity Hessian and ``block_size >= in_features`` the mask is global magnitude
    pruning of the matrix (:func:`lowest_mask` of ``|W|``) and the kept weights are
    unchanged. N:M masks are chosen per row at the first column of each group, scored
    the same way on the current weights.

    Inputs whose Hessian diagonal is 0 were never active during calibration ("dead"
    inputs). Their weight columns become zero even where the mask is False, which
    happens only when a block, or an N:M group, contains more dead weights than it
    prunes.

    Args:
        weight: tensor of shape ``(out_features, in_features)`` and dtype float32,
            float16 or bfloat16, on CPU or CUDA. It is modified in place and keeps its
            dtype. It may be a view, such as the transpose of a ``Conv1D`` weight, and
            the result is written through it.
        hessian: tensor of shape ``(in_features, in_features)``, for example
            :meth:`InputStatistics.hessian`. It must be symmetric, because only its
            lower triangle enters the Cholesky factorisation. It is not modified.
        sparsity: fraction of each block to prune, in ``[0, 1)``.
        kept: for N:M, the weights kept per group, in ``1 .. group-1``.
        group: for N:M, the number of consecutive columns per group. It must divide
            ``in_features`` and ``block_size``.
        block_size: number of columns whose updates are applied together. Apart from
            rounding, the result depends on it only through the unstructured masks,
            which are chosen per block.
        dampening: fraction of the mean Hessian diagonal added to the diagonal before
            inversion, at least 0.

    Returns:
        Bool mask of the shape and device of ``weight``, True where pruned. Pruned
        weights are exactly zero afterwards.

    Raises:
        ValueError: for invalid arguments, non-finite weights or Hessian, or a Hessian
            that is not positive definite after dampening.
        TypeError: for a weight dtype other than float32, float16 or bfloat16.
    """
    _check_matrix(weight, "weight")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    in_features = weight.shape[1]
    _check_sparsegpt_arguments(in_features, hessian, sparsity, kept, group, block_size, dampening)

    work = weight.detach().to(dtype=torch.float32, copy=True)
    _check_finite(work, "weight")
    hessian = hessian.detach().to(device=work.device, dtype=torch.float32, copy=True)
    _check_finite(hessian, "hessian")

    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    work[:, dead] = 0.0
    hessian.diagonal().add_(dampening * hessian.diagonal().mean())
    hinv = _upper_cholesky_of_inverse(hessian, dampening)

    mask = torch.zeros(work.shape, dtype=torch.bool, device=work.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        # The block is a view, so the column updates write into ``work``.
        block_errors = _prune_block_(work[:, start:end], hinv[start:end, start:end], mask[:, start:end], sparsity, kept, group)
        # Lazy batch update: the later columns get the whole block's updates at once.
        work[:, end:].addmm_(block_errors, hinv[start:end, end:], alpha=-1.0)

    weight.copy_(work)
    return mask


def _prune_block_(
    block: Tensor,
    hinv_block: Tensor,
    block_mask: Tensor,
    sparsity: float | None,
    kept: int | None,
    group: int | None,
) -> Tensor:
    """Prune the columns of one block in order, updating ``block`` and filling ``block_mask`` in place.

    Returns the scaled errors ``(w_j - q_j) / Hinv[j, j]`` of each column, shape
    ``(out_features, width)``, which the caller propagates to the later blocks.
    """
    width = block.shape[1]
    diagonal = hinv_block.diagonal()
    errors = torch.zeros_like(block)
    if sparsity is not None:
        # |w| / d orders the weights like w**2 / d**2 and rounds fewer distinct values together.
        scores = block.abs() / diagonal[None, :]
        block_mask.copy_(_lowest_flat(scores, round(sparsity * block.numel())))

    for j in range(width):
        if group is not None and j % group == 0:
            scores = block[:, j : j + group].abs() / diagonal[None, j : j + group]
            block_mask[:, j : j + group] = _lowest_along_last_dim(scores, group - kept)

        column = block[:, j]
        # Only the pruned entries of the column change, so only they contribute an error.
        removed = torch.where(block_mask[:, j], column, 0.0)
        error = removed / diagonal[j]
        block[:, j + 1 :].addr_(error, hinv_block[j, j + 1 :], alpha=-1.0)
        # Writing the zeros directly keeps pruned weights exactly 0, which w - error * d
        # would miss by a rounding error.
        column.masked_fill_(block_mask[:, j], 0.0)
        errors[:, j] = error
    return errors


def _upper_cholesky_of_inverse(hessian: Tensor, dampening: float) -> Tensor:
    """Return the upper Cholesky factor ``U`` of ``hessian^-1`` (``hessian^-1 = U^T U``).

    Row ``j`` of ``U`` divided by ``U[j, j]`` is the OBS update direction for pruning
    column ``j`` after columns ``0 .. j-1`` are fixed.
    """
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info.item() == 0:
        inverse = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if info.item() != 0:
        raise ValueError(
            f"the Hessian is not positive definite after dampening {dampening} (the fraction of its mean "
            "diagonal added to the diagonal), so SparseGPT cannot invert it. Raise "
            "pruning.sparsegpt.dampening or add calibration samples."
        )
    return upper


def _lowest_flat(scores: Tensor, count: int) -> Tensor:
    """Return a mask of the ``count`` lowest scores of the flattened tensor, lower index first among ties."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.sort(flat, stable=True).indices
        mask[order[:count]] = True
    return mask.reshape(scores.shape)


def _lowest_along_last_dim(scores: Tensor, count: int) -> Tensor:
    """Return a mask of the ``count`` lowest scores along the last dimension, lower index first among ties."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices
        mask.scatter_(-1, order[..., :count], True)
    return mask


def _check_sparsegpt_arguments(
    in_features: int,
    hessian: Tensor,
    sparsity: float | None,
    kept: int | None,
    group: int | None,
    block_size: int,
    dampening: float,
) -> None:
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)} but the weight has {in_features} input features, so it "
            f"must have shape ({in_features}, {in_features}). Pass the Hessian of this layer's inputs."
        )
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if isinstance(dampening, bool) or not isinstance(dampening, numbers.Real) or not (
        math.isfinite(dampening) and dampening >= 0
    ):
        raise ValueError(f"dampening must be a finite number >= 0, got {dampening!r}. The usual value is 0.01.")

    n_m = kept is not None or group is not None
    if sparsity is not None and n_m:
        raise ValueError(
            f"got both sparsity={sparsity!r} and kept={kept!r}, group={group!r}. Pass sparsity for "
            "unstructured pruning or kept and group for N:M pruning, not both."
        )
    if sparsity is None and not n_m:
        raise ValueError("missing pruning target. Pass sparsity for unstructured pruning or kept and group for N:M pruning.")
    if sparsity is not None:
        _check_sparsity(sparsity)
        return
    if kept is None or group is None:
        raise ValueError(f"N:M pruning needs both kept and group, got kept={kept!r}, group={group!r}")
    _check_n_m(kept, group)
    _check_group_divides(in_features, group)
    if block_size % group != 0:
        raise ValueError(
            f"block_size {block_size} is not a multiple of group {group}, so a group would span two "
            "blocks. Choose a block_size that is a multiple of the group size."
        )


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if math.isnan(sparsity) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}. Pass the fraction of weights to prune, such as 0.5.")


def _check_n_m(kept: int, group: int) -> None:
    for name, value in (("kept", kept), ("group", group)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if group < 2:
        raise ValueError(f"group must be at least 2, got {group}. For 2:4 sparsity pass kept=2, group=4.")
    if not 1 <= kept <= group - 1:
        raise ValueError(
            f"kept must be in 1..{group - 1} for group {group}, got {kept}. For 2:4 sparsity pass kept=2, group=4."
        )


def _check_group_divides(in_features: int, group: int) -> None:
    if in_features % group != 0:
        raise ValueError(
            f"in_features {in_features} is not divisible by group {group}, so the columns cannot be split "
            "into N:M groups. Use a group size that divides the number of input features."
        )


def _check_matrix(tensor: Tensor, name: str) -> None:
    if tensor.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (out_features, in_features), got shape {tuple(tensor.shape)}. "
            "Transpose a Conv1D weight to nn.Linear orientation first."
        )


def _check_no_nan(tensor: Tensor, name: str) -> None:
    if torch.isnan(tensor).any():
        raise ValueError(
            f"{name} contain NaN, which has no order. Check the weights and input statistics they came from."
        )


def _check_finite(tensor: Tensor, name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"{name} contains NaN or infinite values, so SparseGPT cannot use it. Check the model weights "
            "and the calibration inputs."
        )
