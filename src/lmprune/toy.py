"""Build small random-weight GPT-2, BART and BERT checkpoints for tests and offline trials.

These models are UNTRAINED: their weights are random draws from each architecture's own
initialiser, so their perplexities and accuracies mean nothing. They exist so that the GPT-2
(``Conv1D``, tied LM head) and BART (encoder and decoder stacks, tied embeddings) code paths can
run without a hub download. Each folder is marked in three ways: ``lmprune_untrained: true`` in
``config.json`` (copied into every checkpoint and result JSON), a ``README.txt``, and an
``UNTRAINED`` line in the logs of every rule that loads it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers

TOY_FAMILIES = {"decoder": "gpt2", "encoder-decoder": "bart", "encoder": "bert"}

_WORDS = (
    "the of and to in a is was for on as with by that it from at his an are were which this "
    "be or has had first their one its new after but who not they have her she two been other "
    "when there all during into school time may years more most only over city some world would "
    "where later up such used many can state about national out known university united then "
    "made = @ . , ( ) ; : ' \" - <unk>"
).split()


def _training_text() -> list[str]:
    """Return about a hundred lines of English-like text to train the toy tokenizers on."""
    lines = []
    for offset in range(len(_WORDS)):
        lines.append(" ".join(_WORDS[offset:] + _WORDS[:offset]))
    return lines + [string.ascii_letters + string.digits + string.punctuation]


def _write_byte_level_tokenizer(folder: Path, special_tokens: list[str], fast_class: type):
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(_training_text(), vocab_size=400, special_tokens=special_tokens)
    tokenizer = fast_class(tokenizer_object=trainer._tokenizer)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _write_gpt2_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    return _write_byte_level_tokenizer(folder, ["<|endoftext|>"], transformers.GPT2TokenizerFast)


def _write_bart_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    return _write_byte_level_tokenizer(
        folder, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], transformers.BartTokenizerFast
    )


def _write_bert_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(_training_text(), vocab_size=400)
    tokenizer = transformers.BertTokenizerFast(tokenizer_object=trainer._tokenizer)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_untrained_model(
    family: str, folder: str | Path, num_layers: int = 2, hidden_size: int = 64, seed: int = 0
) -> Path:
    """Write a random-weight model of ``family`` with its tokenizer into ``folder``.

    Args:
        family: "decoder" (GPT-2: GPT2LMHeadModel), "encoder-decoder" (BART:
            BartForConditionalGeneration, ``num_layers`` in each stack) or "encoder" (BERT:
            BertForMaskedLM).
        folder: created if missing; existing files of the same names are overwritten.
        num_layers: transformer layers (per stack for BART).
        hidden_size: model width; the feed-forward width is 4 * hidden_size.
        seed: seed of torch's generator for the weights.

    Returns:
        The folder, as a Path.
    """
    if family not in TOY_FAMILIES:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(TOY_FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden_size // 32)

    if family == "decoder":
        tokenizer = _write_gpt2_tokenizer(folder)
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_positions=256, n_embd=hidden_size, n_layer=num_layers,
            n_head=heads, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model_class = transformers.GPT2LMHeadModel
    elif family == "encoder-decoder":
        tokenizer = _write_bart_tokenizer(folder)
        config = transformers.BartConfig(
            vocab_size=len(tokenizer), max_position_embeddings=256, d_model=hidden_size,
            encoder_layers=num_layers, decoder_layers=num_layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=4 * hidden_size, decoder_ffn_dim=4 * hidden_size,
        )
        model_class = transformers.BartForConditionalGeneration
    else:
        tokenizer = _write_bert_tokenizer(folder)
        config = transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=heads, intermediate_size=4 * hidden_size, max_position_embeddings=256,
        )
        model_class = transformers.BertForMaskedLM

    config.lmprune_untrained = True
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(folder)
    (folder / "README.txt").write_text(
        f"UNTRAINED {model_class.__name__} with random weights (seed {seed}), built by "
        "lmprune.toy for tests. Its metrics mean nothing.\n"
    )
    return folder
