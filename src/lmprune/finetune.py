"""Fine-tune and evaluate pruned checkpoints: causal LM perplexity and GLUE QNLI accuracy.

The training loop is plain PyTorch, written to be read top to bottom: AdamW, a linear
warmup-and-decay schedule, gradient-norm clipping, and :class:`SparsityMasks` re-zeroing the
pruned weights after every optimizer step. ``transformers.Trainer`` is not used. With a
:class:`lmprune.distributed.DistributedContext`, :func:`train` runs the same loop as one rank
of a DistributedDataParallel (DDP) job. The steps that differ are marked "DDP:".

Perplexity is ``exp`` of the mean token cross-entropy (nats) over non-overlapping blocks: each
block of ``block_size`` tokens predicts its last ``block_size - 1`` tokens from the tokens
before them in the same block, with no context carried across blocks. The mean is taken over
all predicted tokens together, so it does not depend on the evaluation batch size.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    get_linear_schedule_with_warmup,
)

from lmprune import data
from lmprune.models import FAMILIES, ModelSourceError, weight_files
from lmprune.pruning import prunable_weights

if TYPE_CHECKING:
    from lmprune.distributed import DistributedContext

__all__ = [
    "QNLI_LABELS",
    "TASKS",
    "ClassificationEvalResult",
    "LMEvalResult",
    "SparsityMasks",
    "TrainResult",
    "evaluate_causal_lm",
    "evaluate_classification",
    "lm_head_is_pretrained",
    "load_task_model",
    "pick_device",
    "set_seed",
    "train",
]

log = logging.getLogger(__name__)

TASKS = ("clm", "qnli")

# The classifier's label ids: the ids lmprune.data gives the QNLI labels (0 = entailment).
QNLI_LABELS = dict(enumerate(data.LABELS))

# The training progress bar shows the loss every this many optimizer steps (each costs a device sync).
_PROGRESS_LOSS_EVERY = 50


# ---------------------------------------------------------------------------------------------
# Device and seed


def pick_device(requested: str = "auto") -> torch.device:
    """Return the torch device for ``requested``: "auto", "cpu", "cuda" or "cuda:N".

    "auto" is CUDA when ``torch.cuda.is_available()``, otherwise the CPU.

    Raises:
        ValueError: for any other string, or for a CUDA device that this torch cannot use.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {requested!r}: use auto, cpu, cuda or cuda:N") from error

    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {requested!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {requested!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}). Set the device to auto or cpu, or run on a GPU "
            "host with a CUDA build of torch."
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {requested!r} not found: this host has {torch.cuda.device_count()} CUDA "
            "device(s). Use cuda or a smaller index."
        )
    return device


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    Raises:
        ValueError: unless ``seed`` is an integer in ``[0, 2**32)``, the range NumPy accepts.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every device, CUDA included (torch.manual_seed docs)


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels so that a clock read after this covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint with a task head


def load_task_model(
    checkpoint_folder: str | Path, task: str, family: str, trust_remote_code: bool = False
) -> tuple[nn.Module, set[str]]:
    """Load a checkpoint with the head of ``task``, in float32 on the CPU.

    - ``"clm"``: ``AutoModelForCausalLM``. GPT-2 loads as ``GPT2LMHeadModel`` and BART as
      ``BartForCausalLM`` (the decoder stack only). Encoder models (``family="encoder"``) load
      with ``config.is_decoder = True``, so BERT becomes ``BertLMHeadModel`` with causal
      self-attention.
    - ``"qnli"``: ``AutoModelForSequenceClassification`` with the two labels of
      :data:`QNLI_LABELS`. A config without a padding token (GPT-2) gets the EOS id as
      ``pad_token_id``, which the model needs to find the last real token of padded inputs.

    Only safetensors weights are read. A BART checkpoint whose decoder embedding is stored
    only as ``model.shared.weight`` (how ``save_pretrained`` writes
    ``BartForConditionalGeneration`` in transformers 5) has that tensor loaded into
    ``BartForCausalLM``'s decoder embedding, to which its LM head is tied.

    Args:
        checkpoint_folder: a transformers folder with ``config.json`` and safetensors weights.
        task: one of :data:`TASKS`.
        family: one of :data:`lmprune.models.FAMILIES`.
        trust_remote_code: passed to transformers, for models defined by code in the folder.

    Returns:
        ``(model, new_parameter_names)``. The model is in eval mode.
        ``new_parameter_names`` contains every name under which
        ``model.named_parameters(remove_duplicate=False)`` lists a parameter that the
        checkpoint lacked and transformers initialised at random, including all names of a
        tied parameter.

    Raises:
        ValueError: for an unknown task or family, or a model type without a class for the task.
        ModelSourceError: if the folder has no config.json or no safetensors weights.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}. Valid tasks: {', '.join(TASKS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}. Valid families: {', '.join(FAMILIES)}")
    folder = Path(checkpoint_folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"no config.json in model folder {str(folder)!r}.")

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    key_mapping = None
    if task == "clm":
        auto_class = AutoModelForCausalLM
        if family == "encoder":
            config.is_decoder = True
        key_mapping = _decoder_embedding_key_mapping(family, _checkpoint_keys(folder))
    else:
        auto_class = AutoModelForSequenceClassification
        _set_qnli_labels(config)
    _check_task_class(auto_class, config, task, trust_remote_code)

    model, loading_info = auto_class.from_pretrained(
        folder,
        config=config,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        key_mapping=key_mapping,
        output_loading_info=True,
    )
    new_parameter_names = _new_parameter_names(model, loading_info["missing_keys"])
    log.info(
        "loaded %s for %s from %s. Newly initialised parameters: %s. Checkpoint tensors not used: %s",
        type(model).__name__,
        task,
        folder,
        sorted(new_parameter_names) or "none",
        sorted(loading_info["unexpected_keys"]) or "none",
    )
    model.eval()
    return model, new_parameter_names


def lm_head_is_pretrained(model: nn.Module, new_parameter_names: Iterable[str]) -> bool:
    """Return True when no parameter of the model's LM head was newly initialised.

    The LM head is the output embedding (``model.get_output_embeddings()``) plus every
    parameter outside ``model.base_model``. For ``BertLMHeadModel`` that includes the
    ``cls.predictions.transform`` layer, so a ``BertModel`` checkpoint, whose output embedding
    is tied to its pretrained word embedding but whose transform layer is new, returns False.

    Raises:
        ValueError: if the model has no output embedding (a classifier, for example).
    """
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is None:
        raise ValueError(f"{type(model).__name__} has no output embedding, so it has no LM head to check.")

    head_ids = {id(parameter) for parameter in output_embeddings.parameters()}
    base_model = model.base_model
    if base_model is not model:
        base_ids = {id(parameter) for parameter in base_model.parameters()}
        head_ids |= {id(parameter) for parameter in model.parameters() if id(parameter) not in base_ids}

    new_names = set(new_parameter_names)
    new_ids = {id(parameter) for name, parameter in model.named_parameters(remove_duplicate=False) if name in new_names}
    return not head_ids & new_ids


def _checkpoint_keys(folder: Path) -> set[str]:
    """Return the tensor names stored in the folder's safetensors files (headers only)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _decoder_embedding_key_mapping(family: str, checkpoint_keys: set[str]) -> dict[str, str] | None:
    """Map ``model.shared.weight`` onto the decoder embedding when the checkpoint stores only the former.

    ``BartForCausalLM`` (and the other ``*ForCausalLM`` decoder wrappers of BART-like
    encoder-decoders) reads ``model.decoder.embed_tokens.weight``. Without the mapping that
    tensor and the LM head tied to it would be initialised at random.
    """
    if family != "encoder-decoder":
        return None
    if "model.shared.weight" in checkpoint_keys and "model.decoder.embed_tokens.weight" not in checkpoint_keys:
        return {r"^model\.shared\.weight$": "model.decoder.embed_tokens.weight"}
    return None


def _set_qnli_labels(config) -> None:
    config.id2label = dict(QNLI_LABELS)
    config.label2id = {label: index for index, label in QNLI_LABELS.items()}
    if config.pad_token_id is None:
        eos_token_id = config.eos_token_id
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
        if eos_token_id is None:
            raise ValueError(
                f"{config.model_type} config has neither pad_token_id nor eos_token_id, so padded "
                "batches cannot be classified. Set pad_token_id in the checkpoint's config.json."
            )
        config.pad_token_id = eos_token_id


def _check_task_class(auto_class: type, config, task: str, trust_remote_code: bool) -> None:
    """Raise ValueError unless ``auto_class`` has a model class for ``config``."""
    from transformers.models.auto import modeling_auto

    mapping_names = {
        AutoModelForCausalLM: modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        AutoModelForSequenceClassification: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }[auto_class]
    if config.model_type in mapping_names:
        return
    if trust_remote_code and auto_class.__name__ in (getattr(config, "auto_map", None) or {}):
        return
    raise ValueError(
        f"model type {config.model_type!r} has no {auto_class.__name__} class in transformers, so "
        f"it cannot run the {task} task. Drop the task for this model or use another model."
    )


def _new_parameter_names(model: nn.Module, missing_keys: Iterable[str]) -> set[str]:
    """Return all names (tied aliases included) of the parameters listed in ``missing_keys``."""
    missing = set(missing_keys)
    named = list(model.named_parameters(remove_duplicate=False))
    new_ids = {id(parameter) for name, parameter in named if name in missing}
    return {name for name, parameter in named if id(parameter) in new_ids}


# ---------------------------------------------------------------------------------------------
# Sparsity masks


class SparsityMasks:
    """Keeps pruned weights at zero through fine-tuning.

    One bool mask per tracked weight tensor (1 byte per weight), on the weight's device, marks
    the weights that were zero when the masks were built. :meth:`apply_` writes zero into
    exactly those positions. The masks hold references to the parameters themselves, so they
    follow ``model.to(device)``, which keeps the parameter objects.
    """

    def __init__(self, named_weights: list[tuple[str, nn.Parameter]], zero_masks: list[Tensor]):
        if len(named_weights) != len(zero_masks):
            raise ValueError(f"got {len(zero_masks)} masks for {len(named_weights)} weight tensors")
        for (name, weight), mask in zip(named_weights, zero_masks):
            if mask.dtype != torch.bool or mask.shape != weight.shape:
                raise ValueError(
                    f"mask for {name!r} must be a bool tensor of shape {tuple(weight.shape)}, "
                    f"got {mask.dtype} of shape {tuple(mask.shape)}"
                )
        self.names = [name for name, _ in named_weights]
        self._weights = [weight for _, weight in named_weights]
        # True where the weight is pruned. Storing the zero positions, not the kept ones, lets
        # apply_ call masked_fill_ without building an inverted temporary.
        self._zero_masks = list(zero_masks)

    @classmethod
    def from_model(
        cls, model: nn.Module, named_weights: list[tuple[str, nn.Parameter]] | None = None
    ) -> "SparsityMasks":
        """Build masks of the weights that are zero now in ``named_weights``.

        Args:
            model: the model that owns the weights.
            named_weights: ``(name, parameter)`` pairs to track. None tracks
                ``lmprune.pruning.prunable_weights(model, include_embeddings=True)``. A parameter
                listed twice (a tied weight under two names) is tracked once, under its first name.

        Raises:
            ValueError: if a tensor is not a parameter of ``model``.
            TypeError: if a tensor is not floating point.
        """
        if named_weights is None:
            named_weights = prunable_weights(model, include_embeddings=True)
        model_parameter_ids = {id(parameter) for parameter in model.parameters()}

        tracked: list[tuple[str, nn.Parameter]] = []
        zero_masks: list[Tensor] = []
        seen_ids: set[int] = set()
        for name, weight in named_weights:
            if id(weight) not in model_parameter_ids:
                raise ValueError(f"{name!r} is not a parameter of the model. Pass the model's own parameters.")
            if not weight.is_floating_point():
                raise TypeError(f"weight {name!r} has dtype {weight.dtype}, but masks need floating-point weights")
            if id(weight) in seen_ids:
                continue
            seen_ids.add(id(weight))
            tracked.append((name, weight))
            zero_masks.append(weight.detach() == 0)
        return cls(tracked, zero_masks)

    @torch.no_grad()
    def apply_(self) -> None:
        """Set every masked weight to zero, in place.

        A mask on another device than its weight (the model was moved after the masks were
        built) is moved to the weight's device first and kept there.

        NOTE: tests/test_finetune.py runs on the CPU only, so this move and the CUDA
        synchronisation in train and the evaluations are not covered by tests.
        """
        for index, (weight, zero_mask) in enumerate(zip(self._weights, self._zero_masks)):
            if zero_mask.device != weight.device:
                zero_mask = zero_mask.to(weight.device)
                self._zero_masks[index] = zero_mask
            weight.masked_fill_(zero_mask, 0)

    def num_zeros(self) -> int:
        """Count the zeros now in the tracked weights, measured on the weights, not read from the masks."""
        return sum(weight.numel() - int(torch.count_nonzero(weight.detach()).item()) for weight in self._weights)

    def num_weights(self) -> int:
        """Return the number of tracked weights (elements, each tied parameter counted once)."""
        return sum(weight.numel() for weight in self._weights)

    def sparsity(self) -> float:
        """Return ``num_zeros() / num_weights()``, or 0.0 when nothing is tracked."""
        num_weights = self.num_weights()
        return self.num_zeros() / num_weights if num_weights else 0.0

    @property
    def memory_bytes(self) -> int:
        """Bytes the masks occupy: one per tracked weight."""
        return sum(mask.numel() * mask.element_size() for mask in self._zero_masks)

    def hook_optimizer(self, optimizer: torch.optim.Optimizer):
        """Register :meth:`apply_` to run after every ``optimizer.step()``.

        Returns:
            The hook handle. Call ``handle.remove()`` to stop re-applying the masks.
        """
        return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: self.apply_())


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """Summary of one :func:`train` call. Times are wall-clock seconds of the training loop only.

    In a DDP run every field covers all ranks together: samples are summed over the ranks
    (including the samples that DistributedSampler repeats to give every rank an equal share),
    and the losses are means over the ranks' batches.
    """

    train_runtime_s: float
    train_samples: int  # samples seen, summed over all epochs
    train_samples_per_s: float
    steps: int  # optimizer steps
    epochs: int
    final_train_loss: float  # loss of the last optimizer step's batch
    mean_train_loss: float  # mean of the per-step batch losses over all steps
    world_size: int = 1  # processes that trained together: 1, or the DDP ranks

    def to_dict(self) -> dict:
        """Return the result as a dict of JSON-serialisable values."""
        return asdict(self)


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    device: torch.device,
    masks: SparsityMasks | None,
    log: logging.Logger,
    progress: bool = True,
    distributed: DistributedContext | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on the batches of ``loader``.

    Each step moves one batch to ``device``, takes the loss from ``model(**batch).loss``,
    back-propagates, clips the global gradient norm to ``max_grad_norm``, and steps AdamW and
    the learning rate schedule. The learning rate rises linearly from 0 to ``learning_rate``
    over the first ``ceil(warmup_ratio * total_steps)`` steps and falls linearly to 0 at the
    last step. When ``masks`` is given, its :meth:`SparsityMasks.apply_` runs after every
    optimizer step.

    Weight decay (decoupled, as in AdamW) applies to parameters with two or more dimensions
    (matrices and embeddings), not to biases and LayerNorm weights.

    Args:
        model: a transformers-style model that returns ``.loss`` when given ``labels``. It is
            moved to ``device`` and left in train mode.
        loader: a sized loader of dicts of tensors that include ``labels``. The batch size is
            read from ``labels.shape[0]``.
        epochs: passes over ``loader``, at least 1.
        learning_rate: peak learning rate, above 0.
        weight_decay: AdamW weight decay, at least 0.
        warmup_ratio: fraction of the steps spent warming up, in ``[0, 1]``.
        max_grad_norm: maximum L2 norm of all gradients together. None or 0 turns clipping off.
        device: where to train.
        masks: zero masks to keep, or None to let pruned weights change.
        log: receives one line per epoch: mean loss, samples per second, seconds elapsed.
        progress: show a tqdm bar per epoch on stderr (on rank 0 only in a DDP run).
        distributed: this process's rank in an initialised process group, or None to train in
            this process alone. With it, ``model`` is wrapped in ``DistributedDataParallel``,
            which averages the gradients of all ranks in every backward pass, so the ranks take
            identical optimizer steps and the masks zero the same positions on every rank.
            ``loader`` must then draw from a ``DistributedSampler``, and its batches are this
            rank's share of each global batch. The epoch lines and the result count all ranks.
            ``model`` itself, not the wrapper, is left trained on every rank.

    Raises:
        ValueError: for out-of-range arguments, an empty loader, a batch without ``labels``,
            a model that returns no loss, or a DDP run whose loader has no DistributedSampler.
    """
    _check_training_arguments(epochs, learning_rate, weight_decay, warmup_ratio, max_grad_norm)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches. Check the training data size and batch size.")
    total_steps = epochs * steps_per_epoch
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    world_size = 1
    if distributed is not None:
        if not isinstance(loader.sampler, DistributedSampler):
            raise ValueError(
                f"a DDP run needs a loader with a DistributedSampler, got {type(loader.sampler).__name__}"
            )
        world_size = distributed.world_size
        progress = progress and distributed.is_main

    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    hook = masks.hook_optimizer(optimizer) if masks is not None else None

    # DDP: forward through the wrapper, which all-reduces the gradients during backward. The
    # optimizer and the masks keep working on the parameters of ``model``, which the wrapper
    # shares. Its constructor broadcasts rank 0's parameters and waits for every rank, so the
    # ranks also start the clock below together. static_graph=True declares that every step
    # uses the same parameters. DDP can then train models with parameters that the loss never
    # reaches, such as the cross-attention of BartForCausalLM, which has no encoder. A model
    # that uses other parameters in other steps (LayerDrop above 0) makes DDP raise an error.
    forward_model = model
    if distributed is not None:
        device_ids = [device.index] if device.type == "cuda" else None
        forward_model = DistributedDataParallel(model, device_ids=device_ids, static_graph=True)
    log.info(
        "training for %d epoch(s) of %d steps: learning rate %g, %d warmup steps, weight decay %g, "
        "max grad norm %s, masks %s",
        epochs, steps_per_epoch, learning_rate, warmup_steps, weight_decay, max_grad_norm,
        "kept" if masks is not None else "off",
    )

    # Loss sums stay on the device, so the loop syncs with the host only for the progress bar.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    last_loss: Tensor | None = None
    samples = 0
    step = 0
    try:
        _synchronize(device)
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            epoch_samples = 0
            epoch_steps = 0
            epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
            if distributed is not None:
                loader.sampler.set_epoch(epoch)  # DDP: a new shuffle each epoch, the same on every rank
            bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", total=steps_per_epoch, unit="step",
                       file=sys.stderr, disable=not progress)
            for batch in bar:
                batch = _to_device(batch, device)
                epoch_samples += _batch_size(batch)

                loss = _forward_loss(forward_model, batch)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()  # the masks' post-hook re-zeroes pruned weights here
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                last_loss = loss.detach()
                epoch_loss += last_loss
                epoch_steps += 1
                step += 1
                if progress and step % _PROGRESS_LOSS_EVERY == 0:
                    bar.set_postfix(loss=f"{last_loss.item():.4f}")

            if epoch_steps == 0:
                raise ValueError(f"the training loader yielded no batches in epoch {epoch} although its length is {steps_per_epoch}.")
            if distributed is not None:
                # DDP: sum the samples and losses of all ranks. This waits for the slowest rank,
                # so after the last epoch rank 0's clock covers the whole job.
                epoch_samples, epoch_loss = _sum_over_ranks(epoch_samples, epoch_loss)
            samples += epoch_samples
            epoch_mean_loss = (epoch_loss / (epoch_steps * world_size)).item()
            total_loss += epoch_loss
            epoch_seconds = time.perf_counter() - epoch_start
            log.info(
                "epoch %d/%d: mean loss %.4f, %.1f samples/s, %.1f s elapsed",
                epoch, epochs, epoch_mean_loss, epoch_samples / epoch_seconds, time.perf_counter() - start,
            )
            if not math.isfinite(epoch_mean_loss):
                log.warning("training loss is %s in epoch %d. Lower the learning rate.", epoch_mean_loss, epoch)
        _synchronize(device)
        runtime = time.perf_counter() - start
    finally:
        if hook is not None:
            hook.remove()

    if distributed is not None:
        # DDP: the mean of the ranks' last losses is the loss of the last global batch, because
        # DistributedSampler gives every rank equally many samples and so equally large batches.
        dist.all_reduce(last_loss)
    return TrainResult(
        train_runtime_s=runtime,
        train_samples=samples,
        train_samples_per_s=samples / runtime,
        steps=step,
        epochs=epochs,
        final_train_loss=float(last_loss.item()) / world_size,
        mean_train_loss=float((total_loss / (step * world_size)).item()),
        world_size=world_size,
    )


def _sum_over_ranks(samples: int, loss_sum: Tensor) -> tuple[int, Tensor]:
    """Return ``samples`` and ``loss_sum`` summed over all ranks of the default process group."""
    totals = torch.stack([torch.tensor(float(samples), dtype=torch.float64, device=loss_sum.device), loss_sum])
    dist.all_reduce(totals)
    return int(totals[0].item()), totals[1]


def _check_training_arguments(
    epochs: int, learning_rate: float, weight_decay: float, warmup_ratio: float, max_grad_norm: float | None
) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not _is_finite_number(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a number above 0, got {learning_rate!r}")
    if not _is_finite_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number of at least 0, got {weight_decay!r}")
    if not _is_finite_number(warmup_ratio) or not 0 <= warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio!r}")
    if max_grad_norm is not None and (not _is_finite_number(max_grad_norm) or max_grad_norm < 0):
        raise ValueError(f"max_grad_norm must be None or a number of at least 0, got {max_grad_norm!r}")


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a decayed group (2-D and up) and an undecayed one."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    decayed = [parameter for parameter in parameters if parameter.dim() >= 2]
    undecayed = [parameter for parameter in parameters if parameter.dim() < 2]
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def _to_device(batch: Mapping, device: torch.device) -> dict:
    """Return a new dict with the tensors of ``batch`` moved to ``device`` and other values unchanged.

    ``batch`` may be any mapping, such as the ``BatchEncoding`` that transformers' collators return.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"batches must be mappings of tensors, got {type(batch).__name__}")
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


def _batch_size(batch: dict) -> int:
    labels = batch.get("labels")
    if not isinstance(labels, Tensor):
        raise ValueError(f"batch has no 'labels' tensor (keys: {sorted(batch)}). Add labels to every batch.")
    return int(labels.shape[0])


def _forward_loss(model: nn.Module, batch: dict) -> Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for a batch with labels.")
    return loss


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class LMEvalResult:
    """Causal LM evaluation over non-overlapping blocks."""

    eval_loss: float  # mean token cross-entropy in nats over all predicted tokens
    perplexity: float  # exp(eval_loss)
    eval_tokens: int  # tokens predicted: eval_blocks * (block_size - 1)
    eval_blocks: int
    block_size: int
    eval_runtime_s: float  # wall-clock seconds

    def to_dict(self) -> dict:
        """Return the result as a dict of JSON-serialisable values."""
        return asdict(self)


@dataclass
class ClassificationEvalResult:
    """Sequence classification evaluation."""

    accuracy: float  # fraction of samples whose argmax logit equals the label
    eval_samples: int
    eval_runtime_s: float  # wall-clock seconds
    eval_loss: float  # mean per-sample cross-entropy in nats

    def to_dict(self) -> dict:
        """Return the result as a dict of JSON-serialisable values."""
        return asdict(self)


@torch.no_grad()
def evaluate_causal_lm(model: nn.Module, blocks: Tensor, *, batch_size: int, device: torch.device) -> LMEvalResult:
    """Compute the mean token cross-entropy and perplexity of ``model`` on ``blocks``.

    Each block of length ``block_size`` is one input. Logits at positions ``0..block_size-2``
    are scored against the tokens at ``1..block_size-1`` with ``F.cross_entropy(reduction="sum")``.
    The sums of all batches are added and divided once by ``num_blocks * (block_size - 1)``, so
    the result is the per-token mean whatever ``batch_size`` is.

    Args:
        model: called as ``model(input_ids=...)`` with a ``[batch, block_size]`` LongTensor, and
            must return ``.logits`` of shape ``[batch, block_size, vocab]``. It is moved to
            ``device`` and left in eval mode.
        blocks: token ids, an integer tensor of shape ``[num_blocks, block_size]`` with
            ``num_blocks >= 1`` and ``block_size >= 2``.
        batch_size: blocks per forward pass.
        device: where to run the model.

    Raises:
        ValueError: for blocks of the wrong shape or dtype, a batch_size below 1, or logits of
            the wrong shape.
    """
    _check_blocks(blocks)
    _check_batch_size(batch_size)
    num_blocks, block_size = blocks.shape
    num_tokens = num_blocks * (block_size - 1)

    model.to(device)
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    _synchronize(device)
    start = time.perf_counter()
    for first in range(0, num_blocks, batch_size):
        input_ids = blocks[first : first + batch_size].to(device=device, dtype=torch.long)
        logits = model(input_ids=input_ids).logits
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
            raise ValueError(
                f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for input_ids of "
                f"shape {tuple(input_ids.shape)}, expected [batch, block_size, vocab]."
            )
        predicted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
        next_tokens = input_ids[:, 1:].reshape(-1)
        total_loss += F.cross_entropy(predicted_logits, next_tokens, reduction="sum")
    eval_loss = float((total_loss / num_tokens).item())
    _synchronize(device)
    runtime = time.perf_counter() - start

    return LMEvalResult(
        eval_loss=eval_loss,
        perplexity=_perplexity(eval_loss),
        eval_tokens=num_tokens,
        eval_blocks=num_blocks,
        block_size=block_size,
        eval_runtime_s=runtime,
    )


@torch.no_grad()
def evaluate_classification(model: nn.Module, loader: DataLoader, *, device: torch.device) -> ClassificationEvalResult:
    """Compute the accuracy and mean cross-entropy of a sequence classifier on ``loader``.

    Each batch's ``labels`` are removed and the other entries are passed as
    ``model(**inputs)``, which must return ``.logits`` of shape ``[batch, num_labels]``. A
    sample is correct when its argmax logit equals its label. Both metrics are means over
    samples, not over batches.

    The model is moved to ``device`` and left in eval mode.

    Raises:
        ValueError: if a batch has no ``labels``, the logits have the wrong shape, or the loader
            yields no samples.
    """
    model.to(device)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    num_samples = 0
    _synchronize(device)
    start = time.perf_counter()
    for batch in loader:
        inputs = _to_device(batch, device)
        num_samples += _batch_size(inputs)
        labels = inputs.pop("labels")

        logits = model(**inputs).logits
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for "
                f"{labels.shape[0]} labels, expected [batch, num_labels]."
            )
        correct += (logits.argmax(dim=-1) == labels).sum()
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
    if num_samples == 0:
        raise ValueError("the evaluation loader yields no samples. Check the evaluation data size.")
    accuracy = correct.item() / num_samples
    eval_loss = float((total_loss / num_samples).item())
    _synchronize(device)
    runtime = time.perf_counter() - start

    return ClassificationEvalResult(
        accuracy=accuracy, eval_samples=num_samples, eval_runtime_s=runtime, eval_loss=eval_loss
    )


def _perplexity(eval_loss: float) -> float:
    try:
        return math.exp(eval_loss)
    except OverflowError:  # eval_loss above about 709.78 nats
        return math.inf


def _check_blocks(blocks: Tensor) -> None:
    if not isinstance(blocks, Tensor) or blocks.dim() != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, Tensor) else type(blocks).__name__
        raise ValueError(f"blocks must be a 2-D tensor [num_blocks, block_size], got {shape}")
    if blocks.dtype.is_floating_point or blocks.dtype.is_complex or blocks.dtype == torch.bool:
        raise ValueError(f"blocks must hold integer token ids, got dtype {blocks.dtype}")
    num_blocks, block_size = blocks.shape
    if num_blocks < 1 or block_size < 2:
        raise ValueError(
            f"blocks has shape {tuple(blocks.shape)}, but it needs at least one block of at least 2 "
            "tokens (a block predicts block_size - 1 tokens)."
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
