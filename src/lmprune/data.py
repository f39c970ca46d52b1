"""Load the two fine-tuning benchmarks and turn them into model inputs.

The benchmarks are causal language modelling on WikiText-2 (perplexity) and GLUE QNLI
(accuracy). Each comes from one of two sources:

- the dataset hub, through ``datasets.load_dataset(hub, hub_config, revision=..., split=...)``;
- a local folder laid out as ``wikitext-2/valid.txt``, ``wikitext-2/test.txt`` and
  ``qnli/dev.tsv``, for machines without hub access. That folder has no training splits, so
  causal LM trains on ``valid.txt`` and evaluates on ``test.txt``, and QNLI splits ``dev.tsv``
  into disjoint train and eval parts by a seeded permutation.

Every corpus carries a provenance dict that result files copy: the dataset id, config,
revision and split for the hub, or the absolute path and SHA-256 of the file for a local folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# QNLI label names; a label's id is its position, as in GLUE (0 = entailment).
LABELS = ("entailment", "not_entailment")

QNLI_HEADER = ("index", "question", "sentence", "label")

# Files of a local data folder, relative to it.
LOCAL_CLM_TRAIN = Path("wikitext-2") / "valid.txt"
LOCAL_CLM_EVAL = Path("wikitext-2") / "test.txt"
LOCAL_QNLI = Path("qnli") / "dev.tsv"
LOCAL_LAYOUT = "wikitext-2/valid.txt, wikitext-2/test.txt and qnli/dev.tsv"

HUB_SETTING_KEYS = ("hub", "hub_config", "revision", "train_split", "eval_split")

# Lines per tokenizer call in causal_lm_blocks: large enough for the fast tokenizers to batch
# well, small enough to stop soon after max_blocks is reached.
TOKENIZE_BATCH_LINES = 1000


class DataError(ValueError):
    """Invalid or missing benchmark data, with the file or value and the fix in the message."""


@dataclass
class TextCorpus:
    """Lines of text for causal language modelling, with their provenance."""

    texts: list[str]
    provenance: dict = field(default_factory=dict)


@dataclass
class PairCorpus:
    """QNLI question/sentence pairs with label ids (indexes into ``LABELS``) and provenance."""

    questions: list[str]
    sentences: list[str]
    labels: list[int]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {len(self.questions), len(self.sentences), len(self.labels)}
        if len(lengths) != 1:
            raise DataError(
                f"PairCorpus columns differ in length: {len(self.questions)} questions, "
                f"{len(self.sentences)} sentences, {len(self.labels)} labels. Pass lists of equal length."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> PairCorpus:
        """Return the pairs at ``indices``, in that order, with ``rows`` in the provenance updated."""
        indices = list(indices)
        return PairCorpus(
            questions=[self.questions[i] for i in indices],
            sentences=[self.sentences[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            provenance={**self.provenance, "rows": len(indices)},
        )


# Local files ---------------------------------------------------------------------------------


def _read_utf8(path: str | Path) -> tuple[Path, str, str]:
    """Read a non-empty UTF-8 file and return its absolute path, text and SHA-256.

    A leading byte order mark is dropped from the text but stays in the hash.
    """
    path = Path(path).resolve()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}. Check the path or the data folder.") from None
    except IsADirectoryError:
        raise DataError(f"data path {path} is a folder. Pass the file inside it.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {path} is not valid UTF-8 (byte {error.start}: {error.reason}). "
            "Convert it to UTF-8 or replace it with an intact copy."
        ) from None
    if not text.strip():
        raise DataError(f"data file {path} is empty. Replace it with an intact copy.")
    return path, text, hashlib.sha256(raw).hexdigest()


def _split_lines(text: str) -> list[str]:
    r"""Split text at ``\n`` (dropping a ``\r`` before it), with no empty item after a final newline.

    ``str.splitlines`` is not used because it also splits at form feeds and Unicode line
    separators, which would cut a paragraph that contains one.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_text_file(path: str | Path) -> TextCorpus:
    """Read a UTF-8 text file into one text per line, blank lines included.

    Raises:
        DataError: if the file is missing, empty (or whitespace only) or not valid UTF-8.
    """
    path, text, sha256 = _read_utf8(path)
    lines = _split_lines(text)
    provenance = {"source": "local", "path": str(path), "sha256": sha256, "rows": len(lines)}
    return TextCorpus(texts=lines, provenance=provenance)


def _parse_qnli_row(path: Path, line_number: int, fields: list[str]) -> tuple[str, str, int]:
    """Return (question, sentence, label id) of one data row of a QNLI TSV file.

    A row with more than four fields has a tab inside its sentence: the first field is the
    index, the second the question, the last the label, and the sentence is the rest joined
    with tabs.
    """
    if len(fields) < len(QNLI_HEADER):
        raise DataError(
            f"{path}, line {line_number}: {len(fields)} tab-separated fields, expected 4 "
            f"({', '.join(QNLI_HEADER)}). Repair or remove that line."
        )
    question = fields[1]
    sentence = "\t".join(fields[2:-1])
    label = fields[-1]
    if label not in LABELS:
        raise DataError(
            f"{path}, line {line_number}: invalid label {label!r}, expected one of "
            f"{', '.join(LABELS)}. Repair that line."
        )
    if not question.strip() or not sentence.strip():
        raise DataError(
            f"{path}, line {line_number}: empty question or sentence. Repair or remove that line."
        )
    return question, sentence, LABELS.index(label)


def read_qnli_tsv(path: str | Path) -> PairCorpus:
    """Read a GLUE QNLI TSV file (columns index, question, sentence, label) into pairs.

    Fields are separated by tabs and never quoted, so quote characters are kept as they are.
    Empty lines are skipped.

    Raises:
        DataError: if the file is missing, empty or not UTF-8, the header differs from
            ``index question sentence label``, a row has fewer than four fields, a label is not
            in ``LABELS``, or the file has no data rows. The message gives the line number.
    """
    path, text, sha256 = _read_utf8(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)

    header = next(reader)
    if tuple(header) != QNLI_HEADER:
        raise DataError(
            f"{path}, line 1: invalid header {header!r}. A GLUE QNLI file starts with the "
            f"tab-separated columns {' '.join(QNLI_HEADER)}."
        )

    questions, sentences, labels = [], [], []
    for fields in reader:
        if not fields:
            continue
        question, sentence, label = _parse_qnli_row(path, reader.line_num, fields)
        questions.append(question)
        sentences.append(sentence)
        labels.append(label)

    if not labels:
        raise DataError(f"{path} has a header but no data rows. Replace it with an intact copy.")
    provenance = {"source": "local", "path": str(path), "sha256": sha256, "rows": len(labels)}
    return PairCorpus(questions, sentences, labels, provenance)


# Sampling ------------------------------------------------------------------------------------


def _check_count(name: str, value: int | None) -> None:
    """Raise DataError unless ``value`` is None or a positive int."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer or None (all), got {value!r}.")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}.")


def _permutation(size: int, seed: int) -> list[int]:
    """Return a permutation of ``range(size)`` that depends only on ``seed``.

    The indices are sorted by keys from ``random.Random(seed).random()``, the one method whose
    sequence Python's random module documentation guarantees across Python versions
    (``shuffle`` and ``sample`` may change).
    """
    generator = random.Random(seed)
    keys = [generator.random() for _ in range(size)]
    return sorted(range(size), key=keys.__getitem__)


def split_pairs(
    corpus: PairCorpus, train_samples: int | None, eval_samples: int | None, seed: int
) -> tuple[PairCorpus, PairCorpus]:
    """Split pairs into disjoint train and eval parts by a permutation seeded with ``seed``.

    The eval part is the first ``eval_samples`` rows of the permutation and the train part the
    next ``train_samples``, so the eval part does not change when only ``train_samples`` does.
    None for one count means all rows that the other part leaves. Each part keeps file order.

    Raises:
        DataError: if both counts are None, a count is not a positive integer, or together they
            exceed the number of pairs (the message gives that number).
    """
    _check_count("train_samples", train_samples)
    _check_count("eval_samples", eval_samples)
    _check_seed(seed)
    total = len(corpus)
    if train_samples is None and eval_samples is None:
        raise DataError(
            f"cannot split {total} pairs with both train_samples and eval_samples set to None (all). "
            "Set at least one of them."
        )
    requested_train = train_samples if train_samples is not None else total - eval_samples
    requested_eval = eval_samples if eval_samples is not None else total - train_samples
    if requested_train < 1 or requested_eval < 1 or requested_train + requested_eval > total:
        raise DataError(
            f"train_samples={train_samples} and eval_samples={eval_samples} request more than the "
            f"{total} pairs available ({_describe_source(corpus.provenance)}). Lower them so "
            f"that each part gets at least one pair and their sum is at most {total}."
        )

    order = _permutation(total, seed)
    eval_indices = sorted(order[:requested_eval])
    train_indices = sorted(order[requested_eval : requested_eval + requested_train])
    selection = {"seed": seed, "selection": "disjoint parts of a seeded permutation", "of_rows": total}
    train = corpus.subset(train_indices)
    train.provenance.update(selection, split="train")
    evaluation = corpus.subset(eval_indices)
    evaluation.provenance.update(selection, split="eval")
    return train, evaluation


def sample_pairs(corpus: PairCorpus, samples: int | None, seed: int) -> PairCorpus:
    """Return ``samples`` pairs drawn without replacement by a permutation seeded with ``seed``.

    The drawn pairs keep their order in ``corpus``. None returns all pairs.

    Raises:
        DataError: if ``samples`` is not a positive integer or exceeds the number of pairs.
    """
    _check_count("samples", samples)
    _check_seed(seed)
    total = len(corpus)
    if samples is None:
        return corpus.subset(range(total))
    if samples > total:
        raise DataError(
            f"requested {samples} samples but the corpus has only {total} pairs "
            f"({_describe_source(corpus.provenance)}). Lower the sample count to at most {total}."
        )
    indices = sorted(_permutation(total, seed)[:samples])
    sample = corpus.subset(indices)
    sample.provenance.update(seed=seed, selection="seeded sample", of_rows=total)
    return sample


def _describe_source(provenance: dict) -> str:
    """Return the file path or the hub dataset and split named in a provenance dict."""
    if "path" in provenance:
        return provenance["path"]
    if "dataset" not in provenance:
        return "in-memory corpus"
    return f"{provenance.get('dataset')} {provenance.get('config')}, split {provenance.get('split')}"


# Benchmarks: local folder or hub ---------------------------------------------------------------


def _local_file(local_dir: str | Path, relative: Path) -> Path:
    """Return ``local_dir / relative``, raising DataError with the expected layout if it is missing."""
    path = (Path(local_dir) / relative).resolve()
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}. The local data folder {Path(local_dir).resolve()} must be "
            f"laid out as {LOCAL_LAYOUT}."
        )
    return path


def _hub_settings(settings: dict) -> dict:
    """Check that ``settings`` names a hub dataset and return the keys this module uses."""
    if not isinstance(settings, dict):
        raise DataError(
            f"dataset settings must be a mapping with keys {', '.join(HUB_SETTING_KEYS)}, got {settings!r}."
        )
    missing = [key for key in HUB_SETTING_KEYS if key not in settings]
    if missing:
        raise DataError(
            f"dataset settings {settings!r} lack {', '.join(missing)}. Set {', '.join(HUB_SETTING_KEYS)} "
            "(for example hub: wikitext, hub_config: wikitext-2-raw-v1, revision: main, "
            "train_split: train, eval_split: test), or set a local data folder."
        )
    for key in HUB_SETTING_KEYS:
        if key != "hub_config" and (not isinstance(settings[key], str) or not settings[key]):
            raise DataError(f"dataset setting {key} must be a non-empty string, got {settings[key]!r}.")
    return {key: settings[key] for key in HUB_SETTING_KEYS}


# The commit of a hub dataset is the name of the folder that contains its cached Arrow files.
# NOTE: this relies on the cache layout of datasets 5.2 (<name>/<config>/<version>/<commit>/),
# which is not a public API. The commit is None for in-memory datasets or another layout.
_COMMIT_FOLDER = re.compile(r"^[0-9a-f]{40}$")


def _hub_commit(dataset) -> str | None:
    """Return the commit hash that the hub revision of a loaded dataset resolved to, if known."""
    for cache_file in getattr(dataset, "cache_files", None) or []:
        folder = Path(cache_file.get("filename", "")).parent.name
        if _COMMIT_FOLDER.match(folder):
            return folder
    return None


def _load_hub_split(settings: dict, split: str):
    """Call ``datasets.load_dataset`` for one split and return the dataset and its provenance."""
    import datasets

    dataset = datasets.load_dataset(
        settings["hub"], settings["hub_config"] or None, revision=settings["revision"], split=split
    )
    provenance = {
        "source": "hub",
        "dataset": settings["hub"],
        "config": settings["hub_config"],
        "revision": settings["revision"],
        "commit": _hub_commit(dataset),
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "split": split,
        "rows": len(dataset),
    }
    log.info(
        "loaded %s %s split %s from the hub: %d rows",
        settings["hub"], settings["hub_config"], split, len(dataset),
    )
    return dataset, provenance


def _require_columns(dataset, columns: Sequence[str], provenance: dict) -> None:
    missing = [name for name in columns if name not in dataset.column_names]
    if missing:
        raise DataError(
            f"hub dataset {_describe_source(provenance)} has no column {', '.join(missing)} "
            f"(columns: {', '.join(dataset.column_names)}). Check the hub and hub_config settings."
        )


def _hub_text_corpus(settings: dict, split: str) -> TextCorpus:
    dataset, provenance = _load_hub_split(settings, split)
    _require_columns(dataset, ["text"], provenance)
    return TextCorpus(texts=list(dataset["text"]), provenance=provenance)


def load_clm_corpora(settings: dict, local_dir: str | Path | None) -> tuple[TextCorpus, TextCorpus]:
    """Load the (train, eval) texts for causal language modelling.

    Args:
        settings: ``hub``, ``hub_config``, ``revision``, ``train_split`` and ``eval_split`` of
            the hub dataset; read only when ``local_dir`` is empty.
        local_dir: a folder laid out as ``wikitext-2/{valid,test}.txt``, or None or "" to load
            from the hub. Locally, ``valid.txt`` is the train corpus and ``test.txt`` the eval one.

    Raises:
        DataError: for missing or invalid settings, files or columns.
    """
    if local_dir:
        train_path = _local_file(local_dir, LOCAL_CLM_TRAIN)
        eval_path = _local_file(local_dir, LOCAL_CLM_EVAL)
        note = (
            "WikiText-2 word-level v1 release. The local folder has no training split, so "
            "valid.txt trains and test.txt evaluates."
        )
        train = read_text_file(train_path)
        train.provenance.update(split="train", note=note)
        evaluation = read_text_file(eval_path)
        evaluation.provenance.update(split="eval", note=note)
        log.info(
            "loaded WikiText-2 from %s: %d train and %d eval lines",
            local_dir, len(train.texts), len(evaluation.texts),
        )
        return train, evaluation

    settings = _hub_settings(settings)
    train = _hub_text_corpus(settings, settings["train_split"])
    evaluation = _hub_text_corpus(settings, settings["eval_split"])
    return train, evaluation


def _hub_pair_corpus(settings: dict, split: str) -> PairCorpus:
    """Load one QNLI split from the hub, checking that every row has a label in ``LABELS``."""
    dataset, provenance = _load_hub_split(settings, split)
    _require_columns(dataset, ["question", "sentence", "label"], provenance)

    names = getattr(dataset.features["label"], "names", None)
    if names is not None and tuple(names) != LABELS:
        raise DataError(
            f"hub dataset {_describe_source(provenance)} has label names {names}, expected "
            f"{list(LABELS)}. Check the hub and hub_config settings."
        )
    labels = [int(label) for label in dataset["label"]]
    invalid = sorted({label for label in labels if label not in range(len(LABELS))})
    if invalid:
        raise DataError(
            f"hub dataset {_describe_source(provenance)} has label ids {invalid} outside "
            f"0..{len(LABELS) - 1} (GLUE marks unlabelled test rows with -1). Use a labelled split "
            "such as train or validation."
        )
    return PairCorpus(list(dataset["question"]), list(dataset["sentence"]), labels, provenance)


def load_qnli_corpora(
    settings: dict,
    local_dir: str | Path | None,
    train_samples: int | None,
    eval_samples: int | None,
    seed: int,
) -> tuple[PairCorpus, PairCorpus]:
    """Load the (train, eval) pairs for QNLI.

    Args:
        settings: ``hub``, ``hub_config``, ``revision``, ``train_split`` and ``eval_split`` of
            the hub dataset; read only when ``local_dir`` is empty.
        local_dir: a folder with ``qnli/dev.tsv``, or None or "" to load from the hub. Locally,
            the file is split into disjoint parts by ``split_pairs``.
        train_samples, eval_samples: pairs per part, drawn by a permutation seeded with
            ``seed``; None means all pairs of the hub split (locally: all pairs the other part
            leaves).

    Raises:
        DataError: for missing or invalid settings, files, columns, labels or sample counts.
    """
    if local_dir:
        corpus = read_qnli_tsv(_local_file(local_dir, LOCAL_QNLI))
        corpus.provenance["note"] = (
            "GLUE QNLI dev split. The local folder has no training split, so this file is split "
            "into train and eval parts."
        )
        train, evaluation = split_pairs(corpus, train_samples, eval_samples, seed)
        log.info("loaded QNLI from %s: %d train and %d eval pairs", local_dir, len(train), len(evaluation))
        return train, evaluation

    # Check the arguments before the download, so a bad value fails fast.
    settings = _hub_settings(settings)
    _check_count("train_samples", train_samples)
    _check_count("eval_samples", eval_samples)
    _check_seed(seed)
    train = sample_pairs(_hub_pair_corpus(settings, settings["train_split"]), train_samples, seed)
    evaluation = sample_pairs(_hub_pair_corpus(settings, settings["eval_split"]), eval_samples, seed)
    return train, evaluation


# Model inputs --------------------------------------------------------------------------------


def _check_length_limit(name: str, value: int, tokenizer, max_positions: int | None) -> None:
    """Raise DataError unless 0 < ``value`` <= the tokenizer's and the model's maximum length."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}.")
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if tokenizer_max is not None and value > tokenizer_max:
        raise DataError(
            f"{name}={value} exceeds the tokenizer's model_max_length={tokenizer_max}. "
            f"Set {name} to at most {tokenizer_max}."
        )
    if max_positions is not None and value > max_positions:
        raise DataError(
            f"{name}={value} exceeds the model's max_position_embeddings={max_positions}. "
            f"Set {name} to at most {max_positions}."
        )


def _line_separator_id(tokenizer) -> int:
    """Return the EOS token id, or the SEP token id for tokenizers without EOS (BERT)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return token_id
    raise DataError(
        f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path}) has neither an EOS nor a "
        "SEP token to separate lines. Set tokenizer.eos_token before building language-modelling blocks."
    )


def _strip_line_end(text: str) -> str:
    return text.rstrip("\r\n")


def causal_lm_blocks(
    tokenizer,
    texts: list[str],
    block_size: int,
    max_blocks: int | None = None,
    max_positions: int | None = None,
) -> torch.LongTensor:
    """Tokenize lines into non-overlapping blocks of ``block_size`` token ids for causal LM.

    Each line that is not blank is tokenized without special tokens, after removing its line
    terminator (hub WikiText rows end in a newline, local file lines do not, so both give the
    same ids). The token lists are joined in order with the EOS token between lines (SEP for
    tokenizers without EOS, such as BERT's), and the stream is cut into consecutive blocks.
    The remainder shorter than a block is dropped. With ``max_blocks``, only the first
    ``max_blocks`` blocks are returned and tokenizing stops once they are complete.

    Args:
        max_positions: the model's maximum sequence length (for example
            ``config.max_position_embeddings``), checked against ``block_size`` when given.

    Returns:
        A LongTensor of shape [number of blocks, block_size].

    Raises:
        DataError: if ``block_size`` exceeds ``tokenizer.model_max_length`` or ``max_positions``,
            the tokenizer has no EOS or SEP token, or the text gives fewer than one block.
    """
    _check_length_limit("block_size", block_size, tokenizer, max_positions)
    _check_count("max_blocks", max_blocks)
    separator = _line_separator_id(tokenizer)
    lines = [_strip_line_end(text) for text in texts if text.strip()]
    needed = None if max_blocks is None else max_blocks * block_size

    stream: list[int] = []
    for start in range(0, len(lines), TOKENIZE_BATCH_LINES):
        batch = lines[start : start + TOKENIZE_BATCH_LINES]
        # verbose=False silences the warning about lines longer than model_max_length: lines
        # are cut into blocks afterwards, so their own length does not matter.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if stream:
                stream.append(separator)
            stream.extend(ids)
        if needed is not None and len(stream) >= needed:
            break

    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise DataError(
            f"{len(lines)} non-blank lines give {len(stream)} tokens, fewer than one block of "
            f"block_size={block_size}. Pass more text or a smaller block_size."
        )
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def encode_pairs(
    tokenizer, corpus: PairCorpus, max_length: int, max_positions: int | None = None
) -> list[dict]:
    """Tokenize each (question, sentence) pair into one unpadded feature dict.

    Each dict has ``input_ids``, ``attention_mask``, ``token_type_ids`` when the tokenizer
    returns them, and ``labels`` (the label id), as lists and ints. Pairs longer than
    ``max_length`` tokens are truncated with ``longest_first``, which trims the longer of the
    two texts first. Padding is left to ``collate_pairs``.

    NOTE: GPT-2 tokenizers (GPT2TokenizerFast in transformers 5.x) add no special tokens, so a
    GPT-2 pair is the question's tokens followed directly by the sentence's, with no separator.

    Raises:
        DataError: if ``max_length`` exceeds ``tokenizer.model_max_length`` or ``max_positions``.
    """
    _check_length_limit("max_length", max_length, tokenizer, max_positions)
    encoded = tokenizer(
        corpus.questions, corpus.sentences, truncation="longest_first", max_length=max_length
    )
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded]
    features = []
    for row, label in enumerate(corpus.labels):
        feature = {name: encoded[name][row] for name in names}
        feature["labels"] = label
        features.append(feature)
    return features


def collate_pairs(tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Return a collator that pads a list of ``encode_pairs`` dicts to the longest one in the batch.

    The collator is ``transformers.DataCollatorWithPadding`` and returns PyTorch tensors,
    ``labels`` included. Tokenizers without a pad token (GPT-2) are rejected: the caller sets
    ``tokenizer.pad_token = tokenizer.eos_token`` first, and the model's
    ``config.pad_token_id`` to the same id so that it finds the last real token of each row.

    Raises:
        DataError: if the tokenizer has no pad token.
    """
    from transformers import DataCollatorWithPadding

    if tokenizer.pad_token is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path}) has no pad token. Set "
            "tokenizer.pad_token = tokenizer.eos_token (and the model's config.pad_token_id) "
            "before collating pairs."
        )
    return DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
