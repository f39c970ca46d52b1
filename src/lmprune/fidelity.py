"""Zero-shot fidelity: how close a pruned model's outputs stay to the dense model's on held-out text.

This is the zero-shot quality measure for models without a pretrained LM head, such as the
sentence-embedding MiniLM, which have no zero-shot perplexity. Both models are loaded as base models
(``transformers.AutoModel``, no task head) and run on the same tokenized lines. The hidden states
compared are the ``last_hidden_state`` of:

- encoders (BERT): the encoder stack, after the last layer's output LayerNorm;
- decoders (GPT-2): the decoder stack, after the final LayerNorm ``ln_f``;
- encoder-decoders (BART): the encoder stack only. ``BartModel.forward`` would return the decoder's
  states for a right-shifted copy of the input, which mixes both stacks into one number.

Over all non-padding tokens (special tokens such as [CLS] and [SEP] included):

- ``relative_error`` = ||H_pruned - H_dense||_F / ||H_dense||_F, both norms over every token
  of every line together;
- ``cosine`` = the mean over lines of cos(mean-pooled H_pruned, mean-pooled H_dense), where
  mean pooling averages a line's hidden states over its non-padding tokens. That is the pooling
  the embedded MiniLM's 1_Pooling/config.json sets, and its final normalization leaves a cosine
  unchanged. ``min_cosine`` is the lowest cosine of any line.

Both models run in float32, whatever dtype the folders store, and their sums are accumulated
in float64, so an unpruned copy gives relative error 0 and cosine 1 to within rounding.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer

from lmprune.data import DataError
from lmprune.finetune import pick_device
from lmprune.models import ModelSourceError, weight_files

log = logging.getLogger(__name__)

# WikiText section headings: " = Title = ", " = = Subsection = = " and deeper levels.
_HEADING = re.compile(r"^(?:= )+.*(?: =)+$")

# Files that a tokenizer's save_pretrained writes (tokenizer_config.json always). transformers 5.25
# builds an empty tokenizer from a folder without any of them instead of raising, so the folder
# is checked first.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

TABLE_COLUMNS = (
    "model", "method", "sparsity", "relative_error", "cosine", "min_cosine", "lines", "tokens",
    "device", "untrained",
)


def held_out_lines(texts: Sequence[str], samples: int, source: str | None = None) -> list[str]:
    """Return the first ``samples`` lines of ``texts`` that are neither blank nor WikiText headings.

    Lines are stripped of surrounding whitespace (hub WikiText rows end in a newline). A heading is
    a line such as ``" = Title = "`` or ``" = = Section = = "``. ``source`` names the text in
    error messages.

    Raises:
        DataError: if ``samples`` is not a positive integer, or the text has fewer usable lines.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DataError(f"samples must be a positive integer, got {samples!r}.")

    lines = []
    for text in texts:
        line = text.strip()
        if not line or _HEADING.match(line):
            continue
        lines.append(line)
        if len(lines) == samples:
            return lines
    raise DataError(
        f"samples={samples} exceeds the {len(lines)} held-out lines (non-blank, not section "
        f"headings) in {source or 'the text'}. Set samples (fidelity.samples in the config) to at "
        f"most {len(lines)}, or use a larger evaluation split."
    )


def load_tokenizer(folder: str | Path):
    """Load the tokenizer saved in a checkpoint folder, padding on the right.

    Tokenizers without a pad token (GPT-2) pad with their EOS token. The attention mask keeps the
    padding out of every result, so the pad id does not matter.

    Raises:
        ModelSourceError: if the folder has no tokenizer files, the tokenizer has no vocabulary
            beyond its special tokens, or it has neither a pad, EOS nor UNK token to pad with.
    """
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            f"checkpoint folder {str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). "
            "Fidelity tokenizes the held-out text with the checkpoint's tokenizer: prune from a source "
            "folder that contains one, or save the tokenizer into the checkpoint folder."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ModelSourceError(
            f"the tokenizer in {str(folder)!r} has {len(tokenizer)} tokens, all of them special tokens, "
            "so every word would become an unknown token. Save the source model's real tokenizer "
            "into the checkpoint folder."
        )
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelSourceError(
                f"the tokenizer in {str(folder)!r} has no pad, EOS or UNK token to pad batches with. "
                "Set tokenizer.pad_token and save it into the checkpoint folder."
            )
        tokenizer.pad_token = fallback
    return tokenizer


def _require_model_files(folder: str | Path) -> None:
    """Raise ModelSourceError unless ``folder`` has a config.json and safetensors weights."""
    if not (Path(folder) / "config.json").is_file():
        raise ModelSourceError(
            f"no config.json in model folder {str(folder)!r}. Pass a folder written by save_pretrained."
        )
    weight_files(folder)


def load_base_model(folder: str | Path, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load the base model (no task head) in ``folder`` in float32 on ``device``, in eval mode.

    A checkpoint saved with a head (BertForMaskedLM, GPT2LMHeadModel, BartForConditionalGeneration)
    loads into its base class, so the head's weights are reported as unexpected keys and ignored.

    Raises:
        ModelSourceError: if the folder has no config.json or no safetensors weights.
    """
    _require_model_files(folder)
    model = AutoModel.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def hidden_states_name(model: torch.nn.Module) -> str:
    """Describe which hidden states :func:`final_hidden_states` returns for ``model``."""
    if model.config.is_encoder_decoder:
        return f"{type(model).__name__} encoder last_hidden_state"
    return f"{type(model).__name__} last_hidden_state"


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the final hidden states [batch, tokens, hidden] of a base model.

    Encoder-decoder models run their encoder alone. Only input ids and the attention mask are
    passed, so BERT gets its default token type 0, the type of a single-sentence input.
    """
    if model.config.is_encoder_decoder:
        model = model.get_encoder()
    return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _check_length(max_length: int, config) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's max_position_embeddings={positions}. "
            f"Set max_length (fidelity.max_length in the config) to at most {positions}."
        )


def _check_inputs(lines: Sequence[str], batch_size: int) -> None:
    if len(lines) == 0:
        raise DataError("no held-out lines to compare the models on. Pass at least one non-blank line.")
    blank = [index for index, line in enumerate(lines) if not line.strip()]
    if blank:
        raise DataError(
            f"held-out line {blank[0]} is blank ({len(blank)} blank lines in all), so it has no tokens "
            "to pool. Drop blank lines first, for example with held_out_lines."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _check_pair(checkpoint: torch.nn.Module, dense: torch.nn.Module, tokenizer, checkpoint_folder, dense_folder) -> None:
    """Raise ModelSourceError unless the two models and the tokenizer fit together."""
    width = checkpoint.config.hidden_size
    dense_width = dense.config.hidden_size
    if width != dense_width:
        raise ModelSourceError(
            f"checkpoint {str(checkpoint_folder)!r} has hidden size {width} but the dense model "
            f"{str(dense_folder)!r} has {dense_width}. Compare a checkpoint with the model it was pruned from."
        )
    for model, folder in ((checkpoint, checkpoint_folder), (dense, dense_folder)):
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ModelSourceError(
                f"the tokenizer of {str(checkpoint_folder)!r} has {len(tokenizer)} tokens but the model "
                f"in {str(folder)!r} embeds only {rows}. Compare a checkpoint with the model it was pruned from."
            )


class _Totals:
    """Running sums over batches: squared error and squared dense norm, tokens, per-line cosines."""

    def __init__(self) -> None:
        self.error_squares = 0.0
        self.dense_squares = 0.0
        self.tokens = 0
        self.cosines: list[torch.Tensor] = []

    def add(self, pruned_states: torch.Tensor, dense_states: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Add one batch of hidden states [batch, tokens, hidden] and its attention mask."""
        # Zero the padding positions in float64, so that they add nothing to the sums or the means.
        mask = attention_mask.unsqueeze(-1).double()
        pruned_states = pruned_states.double() * mask
        dense_states = dense_states.double() * mask
        self.error_squares += float(((pruned_states - dense_states) ** 2).sum())
        self.dense_squares += float((dense_states**2).sum())

        counts = attention_mask.sum(dim=1, keepdim=True).double()
        self.tokens += int(counts.sum())
        pruned_pooled = pruned_states.sum(dim=1) / counts
        dense_pooled = dense_states.sum(dim=1) / counts
        cosine = F.cosine_similarity(pruned_pooled, dense_pooled, dim=-1)
        self.cosines.append(cosine.clamp(-1.0, 1.0).cpu())


def measure_fidelity(
    checkpoint_folder: str | Path,
    dense_folder: str | Path,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Compare the final hidden states of a pruned checkpoint and its dense model on ``texts``.

    Each text is one line (see :func:`held_out_lines`), tokenized with the checkpoint's tokenizer,
    truncated to ``max_length`` tokens and padded per batch of ``batch_size`` lines. Both models get
    the same batches. The metrics are defined in the module docstring.

    Args:
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device.
            NOTE: only the CPU path has been run. On CUDA, an unpruned copy is expected to give
            exactly 0 and 1 as on the CPU, because both models run the same kernels on the same batches.

    Returns:
        ``relative_error``, ``cosine``, ``min_cosine``, ``lines``, ``tokens`` (non-padding tokens
        compared), ``device``, ``dtype``, ``max_length``, ``batch_size`` and ``hidden_states``
        (which model output was compared).

    Raises:
        DataError: if ``texts`` is empty or has a blank line.
        ModelSourceError: if a folder lacks config or weights, the checkpoint lacks a tokenizer, or
            the two models differ in hidden size or have fewer embeddings than the tokenizer has tokens.
        ValueError: for an invalid ``max_length``, ``batch_size`` or ``device``.
    """
    _check_inputs(texts, batch_size)
    for folder in (checkpoint_folder, dense_folder):
        _require_model_files(folder)
    _check_length(max_length, AutoConfig.from_pretrained(checkpoint_folder, trust_remote_code=trust_remote_code))
    device = device if isinstance(device, torch.device) else pick_device(device)
    tokenizer = load_tokenizer(checkpoint_folder)
    checkpoint = load_base_model(checkpoint_folder, device, trust_remote_code)
    dense = load_base_model(dense_folder, device, trust_remote_code)
    _check_pair(checkpoint, dense, tokenizer, checkpoint_folder, dense_folder)

    log.info(
        "comparing %s with %s on %d lines (at most %d tokens each, %d per batch) on %s",
        hidden_states_name(checkpoint), dense_folder, len(texts), max_length, batch_size, device,
    )
    totals = _Totals()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                truncation=True,
                max_length=max_length,
                padding="longest",
                return_tensors="pt",
            )
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            totals.add(
                final_hidden_states(checkpoint, input_ids, attention_mask),
                final_hidden_states(dense, input_ids, attention_mask),
                attention_mask,
            )

    if totals.dense_squares == 0.0:
        raise ValueError(
            f"the dense model {str(dense_folder)!r} returned all-zero hidden states, so the relative "
            "error is undefined. Check that the dense folder holds trained weights."
        )
    cosines = torch.cat(totals.cosines)
    result = {
        "relative_error": math.sqrt(totals.error_squares / totals.dense_squares),
        "cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "lines": len(texts),
        "tokens": totals.tokens,
        "device": str(device),
        "dtype": "float32",
        "max_length": max_length,
        "batch_size": batch_size,
        "hidden_states": hidden_states_name(checkpoint),
    }
    log.info(
        "relative error %.6g, mean cosine %.6f (min %.6f) over %d lines and %d tokens",
        result["relative_error"], result["cosine"], result["min_cosine"], len(texts), totals.tokens,
    )
    return result


def fidelity_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Turn fidelity JSONs (one per model, method and sparsity) into a table with ``TABLE_COLUMNS``.

    ``sparsity`` is the target fraction from 0 to 1. Rows are sorted by model, method and sparsity.

    Raises:
        ValueError: if a record lacks one of the columns.
    """
    rows = []
    for index, record in enumerate(records):
        missing = [column for column in TABLE_COLUMNS if column not in record]
        if missing:
            raise ValueError(
                f"fidelity record {index} lacks {', '.join(missing)}. Rerun measure_fidelity for it."
            )
        rows.append({column: record[column] for column in TABLE_COLUMNS})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return table.sort_values(["model", "method", "sparsity"], kind="stable", ignore_index=True)
