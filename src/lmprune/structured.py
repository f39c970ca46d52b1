"""Structured pruning of the feed-forward (FFN) neurons of BERT, GPT-2 and BART models.

The FFN of a transformer layer is ``down(act(up(x)))``. Neuron ``j`` is output feature ``j`` of
the up projection and input feature ``j`` of the down projection. Removing it deletes row ``j``
and bias ``j`` of the up projection and column ``j`` of the down projection, with rows and
columns as in ``nn.Linear``'s ``(out_features, in_features)`` layout. The result is a smaller
dense model, not a masked one.

A config has one FFN width per stack of layers, so every layer of a stack keeps the same number
of neurons. Each layer keeps its own most important neurons (see :func:`neuron_importance`).
The new widths are written into the config, so ``save_pretrained`` followed by stock
transformers' ``from_pretrained`` rebuilds the pruned model.

Supported layers (transformers 5) and the config attribute of each stack's width:

- BERT ``BertLayer``: up ``intermediate.dense``, down ``output.dense``, ``intermediate_size``;
- GPT-2 ``GPT2Block``: up ``mlp.c_fc``, down ``mlp.c_proj``, ``n_inner`` (None means
  ``4 * n_embd``). Both are ``Conv1D``, whose weight is stored as ``(in_features, out_features)``;
- BART ``BartEncoderLayer`` and ``BartDecoderLayer``: up ``fc1``, down ``fc2``,
  ``encoder_ffn_dim`` and ``decoder_ffn_dim``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.models.bart.modeling_bart import BartDecoderLayer, BartEncoderLayer
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.pytorch_utils import Conv1D

__all__ = [
    "HEADS_NOT_PRUNED_REASON",
    "FfnBlock",
    "ffn_blocks",
    "neuron_importance",
    "prune_ffn_",
    "select_neurons",
    "shrink_block_",
]

# NOTE: attention heads are never removed. BERT, GPT-2 and BART compute the head size as
# hidden_size / num_heads (transformers 5.25), so their configs cannot describe a layer with fewer
# heads than the others, and transformers 5 no longer has PreTrainedModel.prune_heads.
HEADS_NOT_PRUNED_REASON = (
    "BERT, GPT-2 and BART compute the attention head size as hidden_size / num_heads, so their "
    "configs cannot describe fewer heads, and transformers 5 no longer has prune_heads."
)

# Layer type, then the paths of the up and down projections inside it, then the config attribute
# of the width.
_LAYER_SPECS: tuple[tuple[type[nn.Module], str, str, str], ...] = (
    (BertLayer, "intermediate.dense", "output.dense", "intermediate_size"),
    (GPT2Block, "mlp.c_fc", "mlp.c_proj", "n_inner"),
    (BartEncoderLayer, "fc1", "fc2", "encoder_ffn_dim"),
    (BartDecoderLayer, "fc1", "fc2", "decoder_ffn_dim"),
)

_SUPPORTED = (
    "BERT (BertLayer), GPT-2 (GPT2Block) and BART (BartEncoderLayer, BartDecoderLayer) models"
)


@dataclass
class FfnBlock:
    """The up and down projections of one transformer layer's FFN.

    ``up`` and ``down`` are the model's own modules, so changing them changes the model. Each is
    an ``nn.Linear`` or, in GPT-2, a ``Conv1D``.
    """

    name: str  # module path of the layer, such as "transformer.h.0"
    stack: str  # config attribute of the width: "intermediate_size", "n_inner", ...
    up: nn.Module
    down: nn.Module

    @property
    def width(self) -> int:
        """Number of neurons: the output features of the up projection."""
        return _output_features(self.up)


def ffn_blocks(model: nn.Module) -> list[FfnBlock]:
    """Return the FFN of every supported transformer layer in ``model``, in module order.

    Module order is layer order within a stack, and BART's encoder stack comes before its
    decoder stack.

    Raises:
        ValueError: if ``model`` contains no supported layer, or a layer's down projection
            does not take as many input features as its up projection has outputs.
    """
    blocks = []
    for name, module in model.named_modules():
        for layer_type, up_path, down_path, stack in _LAYER_SPECS:
            if isinstance(module, layer_type):
                block = FfnBlock(name, stack, module.get_submodule(up_path), module.get_submodule(down_path))
                _check_block(block)
                blocks.append(block)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no FFN layers that structured pruning supports. "
            f"Supported: {_SUPPORTED}."
        )
    return blocks


def neuron_importance(block: FfnBlock, activation_norms: Tensor | None = None) -> Tensor:
    """Score each neuron of ``block`` by how much it can add to the down projection's output.

    Let ``d_j`` be the down projection's weights for neuron ``j`` (column ``j`` of an
    ``nn.Linear`` weight) and ``a_j`` the neuron's activations on the calibration tokens.

    With ``activation_norms`` (``||a_j||_2``, the L2 norm over all calibration tokens of neuron
    ``j``'s output after the activation function, which is input feature ``j`` of the down
    projection), the importance is ``||a_j||_2 * ||d_j||_2``. That is the Frobenius norm of the
    term ``a_j d_j^T`` that neuron ``j`` adds to the down projection's output on those tokens,
    so removing the neuron changes that output by exactly this much. Downstream layers may
    amplify or damp the change.

    Without ``activation_norms``, the importance is ``||u_j||_2 * ||d_j||_2`` where ``u_j`` is
    row ``j`` of the up projection's weight. It needs no data. For any input ``x``,
    ``|u_j . x| <= ||u_j||_2 ||x||_2``, so it ranks the neurons by a bound on their pre-activation
    size times their output weights, ignoring the up bias and the activation function.

    Args:
        block: the FFN to score. It is not modified.
        activation_norms: tensor of shape ``(block.width,)``, non-negative and finite, in any
            float dtype and on any device.

    Returns:
        float32 tensor of shape ``(block.width,)`` on the device of the down projection's weight.

    Raises:
        ValueError: if ``activation_norms`` has the wrong shape or a negative or non-finite
            value, or an importance is NaN.
    """
    with torch.no_grad():
        down_norms = torch.linalg.vector_norm(_neuron_down_weights(block.down), dim=1, dtype=torch.float32)
        if activation_norms is None:
            up_norms = torch.linalg.vector_norm(_neuron_up_weights(block.up), dim=1, dtype=torch.float32)
            importance = up_norms.to(down_norms.device) * down_norms
        else:
            norms = _checked_activation_norms(block, activation_norms)
            importance = norms.to(down_norms.device) * down_norms

    if torch.isnan(importance).any():
        raise ValueError(f"neuron importance of layer {block.name!r} contains NaN. Check its weights for NaN.")
    return importance


def select_neurons(importance: Tensor, num_kept: int) -> Tensor:
    """Return the indices of the ``num_kept`` most important neurons, sorted ascending.

    Among neurons of equal importance, the one with the lower index is kept.

    Args:
        importance: tensor of shape ``(width,)`` without NaN.
        num_kept: number of neurons to keep, from 1 to ``width``.

    Returns:
        int64 tensor of shape ``(num_kept,)`` on the device of ``importance``.

    Raises:
        ValueError: if ``importance`` is not 1-D or ``num_kept`` is out of range.
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must be a 1-D tensor, got shape {tuple(importance.shape)}")
    width = importance.numel()
    if isinstance(num_kept, bool) or not isinstance(num_kept, numbers.Integral) or not 1 <= num_kept <= width:
        raise ValueError(f"num_kept must be an integer from 1 to {width}, got {num_kept!r}")

    # A stable sort keeps equal values in index order, so ties go to the lower index.
    order = torch.sort(importance, descending=True, stable=True).indices
    return torch.sort(order[:num_kept]).values


def shrink_block_(block: FfnBlock, keep: Tensor) -> None:
    """Remove every neuron of ``block`` except those in ``keep``, in place.

    Slices the up projection's weight and bias down to the kept output features and the down
    projection's weight down to the kept input features. The kept neurons stay in their order.
    The weight and bias parameters of both modules are replaced by new ``nn.Parameter`` objects
    with the same dtype, device and ``requires_grad``, so an optimizer built before the call
    still refers to the old ones. ``in_features``/``out_features`` (``nn.Linear``) or
    ``nx``/``nf`` (``Conv1D``) are updated. The model's config is not changed.

    Args:
        block: the FFN to shrink.
        keep: 1-D integer tensor of strictly increasing neuron indices in ``[0, block.width)``,
            with at least one index.

    Raises:
        ValueError: if ``keep`` is empty, not a 1-D integer tensor, not strictly increasing or
            out of range.
    """
    _check_keep(block, keep)
    with torch.no_grad():
        _keep_output_features_(block.up, keep)
        _keep_input_features_(block.down, keep)


def prune_ffn_(model: nn.Module, fraction: float, activation_norms: dict[str, Tensor] | None = None) -> dict:
    """Remove the least important ``fraction`` of the FFN neurons of every layer, in place.

    Each stack of layers keeps ``max(1, round((1 - fraction) * width))`` neurons per layer, with
    Python's ``round``. Each layer keeps its own most important neurons by
    :func:`neuron_importance`, and ties go to the lower index. The config attribute of each
    changed stack is set to the new width. All inputs are checked before anything is modified,
    and ``fraction=0`` leaves the model and its config unchanged.

    Args:
        model: a BERT, GPT-2 or BART model whose ``config`` has the width attribute of each of
            its stacks.
        fraction: fraction of each layer's neurons to remove, in ``[0, 1)``.
        activation_norms: maps every :attr:`FfnBlock.name` of ``model`` to the L2 norms of its
            neurons' activations over calibration tokens, of shape ``(width,)``. With None, the
            importance uses weights only.

    Returns:
        JSON-ready report with the keys ``method`` (``"ffn_neurons"``), ``fraction``,
        ``importance`` (``"activation_norms"`` or ``"weight_norms"``), ``stacks``
        (per config attribute: ``width_before``, ``width_after`` and ``layers``, the layer
        names), ``neurons_before``, ``neurons_after``, ``neurons_removed_fraction``,
        ``parameters_before``, ``parameters_after`` (unique parameters, tied ones counted once)
        and ``heads`` (``pruned`` and ``reason``).

    Raises:
        ValueError: for a ``fraction`` outside ``[0, 1)``, an unsupported model, a config that
            has no width attribute or disagrees with the layers, or invalid ``activation_norms``.
    """
    _check_fraction(fraction)
    blocks = ffn_blocks(model)
    stacks = _group_by_stack(model, blocks)
    norms_by_name = _checked_norms_by_name(blocks, activation_norms)
    parameters_before = _count_parameters(model)

    stack_reports = {}
    for stack, stack_blocks in stacks.items():
        width = stack_blocks[0].width
        num_kept = max(1, round((1 - fraction) * width))
        if num_kept < width:
            for block in stack_blocks:
                importance = neuron_importance(block, norms_by_name.get(block.name))
                shrink_block_(block, select_neurons(importance, num_kept))
            setattr(model.config, stack, num_kept)
        stack_reports[stack] = {
            "width_before": width,
            "width_after": num_kept,
            "layers": [block.name for block in stack_blocks],
        }

    neurons_before = sum(report["width_before"] * len(report["layers"]) for report in stack_reports.values())
    neurons_after = sum(report["width_after"] * len(report["layers"]) for report in stack_reports.values())
    return {
        "method": "ffn_neurons",
        "fraction": float(fraction),
        "importance": "weight_norms" if activation_norms is None else "activation_norms",
        "stacks": stack_reports,
        "neurons_before": neurons_before,
        "neurons_after": neurons_after,
        "neurons_removed_fraction": (neurons_before - neurons_after) / neurons_before,
        "parameters_before": parameters_before,
        "parameters_after": _count_parameters(model),
        "heads": {"pruned": False, "reason": HEADS_NOT_PRUNED_REASON},
    }


def _output_features(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def _input_features(module: nn.Module) -> int:
    return module.nx if isinstance(module, Conv1D) else module.in_features


def _neuron_up_weights(up: nn.Module) -> Tensor:
    """Return the up projection's weights as a view of shape (width, in_features)."""
    return up.weight.t() if isinstance(up, Conv1D) else up.weight


def _neuron_down_weights(down: nn.Module) -> Tensor:
    """Return the down projection's weights as a view of shape (width, out_features)."""
    return down.weight if isinstance(down, Conv1D) else down.weight.t()


def _keep_output_features_(module: nn.Module, keep: Tensor) -> None:
    # nn.Linear stores output features as weight rows, Conv1D as weight columns.
    if isinstance(module, Conv1D):
        module.weight = _sliced_parameter(module.weight, 1, keep)
        module.nf = keep.numel()
    else:
        module.weight = _sliced_parameter(module.weight, 0, keep)
        module.out_features = keep.numel()
    if module.bias is not None:
        module.bias = _sliced_parameter(module.bias, 0, keep)


def _keep_input_features_(module: nn.Module, keep: Tensor) -> None:
    # The bias belongs to the output features, so it stays whole.
    if isinstance(module, Conv1D):
        module.weight = _sliced_parameter(module.weight, 0, keep)
        module.nx = keep.numel()
    else:
        module.weight = _sliced_parameter(module.weight, 1, keep)
        module.in_features = keep.numel()


def _sliced_parameter(parameter: nn.Parameter, dim: int, keep: Tensor) -> nn.Parameter:
    sliced = torch.index_select(parameter.detach(), dim, keep.to(parameter.device))
    return nn.Parameter(sliced, requires_grad=parameter.requires_grad)


def _check_block(block: FfnBlock) -> None:
    for role, module in (("up", block.up), ("down", block.down)):
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(
                f"the {role} projection of layer {block.name!r} is a {type(module).__name__}, "
                "but structured pruning supports nn.Linear and Conv1D only."
            )
    if _input_features(block.down) != block.width:
        raise ValueError(
            f"layer {block.name!r} has {block.width} FFN neurons in its up projection but "
            f"{_input_features(block.down)} input features in its down projection."
        )


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if math.isnan(fraction) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")


def _check_keep(block: FfnBlock, keep: Tensor) -> None:
    if not isinstance(keep, Tensor) or keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise ValueError(f"keep must be a 1-D integer tensor of neuron indices, got {keep!r}")
    if keep.numel() == 0:
        raise ValueError(f"keep is empty, but layer {block.name!r} must keep at least one neuron.")
    if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
        raise ValueError("keep must be strictly increasing (sorted ascending, without duplicates).")
    first, last = int(keep[0]), int(keep[-1])
    if first < 0 or last >= block.width:
        raise ValueError(f"keep has indices from {first} to {last}, but layer {block.name!r} has {block.width} neurons.")


def _checked_activation_norms(block: FfnBlock, activation_norms: Tensor) -> Tensor:
    """Return ``activation_norms`` as float32 after checking its shape and values against ``block``."""
    if not isinstance(activation_norms, Tensor) or tuple(activation_norms.shape) != (block.width,):
        shape = tuple(activation_norms.shape) if isinstance(activation_norms, Tensor) else type(activation_norms).__name__
        raise ValueError(
            f"activation norms of layer {block.name!r} must be a tensor of shape ({block.width},), got {shape}"
        )
    norms = activation_norms.detach().to(torch.float32)
    if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
        raise ValueError(f"activation norms of layer {block.name!r} must be finite and non-negative.")
    return norms


def _checked_norms_by_name(blocks: list[FfnBlock], activation_norms: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if activation_norms is None:
        return {}
    names = [block.name for block in blocks]
    missing = [name for name in names if name not in activation_norms]
    unknown = sorted(set(activation_norms) - set(names))
    if missing or unknown:
        raise ValueError(
            f"activation_norms must have one entry per FFN layer. Missing: {missing}. Unknown: {unknown}. "
            "Key the norms by FfnBlock.name from ffn_blocks(model)."
        )
    return {block.name: _checked_activation_norms(block, activation_norms[block.name]) for block in blocks}


def _group_by_stack(model: nn.Module, blocks: list[FfnBlock]) -> dict[str, list[FfnBlock]]:
    """Group ``blocks`` by config attribute after checking that the config and every layer agree."""
    config = getattr(model, "config", None)
    stacks: dict[str, list[FfnBlock]] = {}
    for block in blocks:
        stacks.setdefault(block.stack, []).append(block)

    for stack, stack_blocks in stacks.items():
        if config is None or not hasattr(config, stack):
            raise ValueError(
                f"{type(model).__name__} has layers of a {stack} stack but its config has no {stack!r} "
                "attribute to store the pruned width. Prune the BERT, GPT-2 or BART model itself."
            )
        expected = _config_width(config, stack)
        for block in stack_blocks:
            if block.width != expected:
                raise ValueError(
                    f"layer {block.name!r} has {block.width} FFN neurons but config.{stack} is {expected}. "
                    "Structured pruning needs the width of the config in every layer of a stack."
                )
    return stacks


def _config_width(config, stack: str) -> int:
    width = getattr(config, stack)
    if stack == "n_inner" and width is None:
        return 4 * config.n_embd
    return width


def _count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
