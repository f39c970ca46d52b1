"""Tests for lmprune.finetune on small untrained models, the real MiniLM and hand-made stubs."""

import logging
import math
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from lmprune.finetune import (
    QNLI_LABELS,
    SparsityMasks,
    evaluate_causal_lm,
    evaluate_classification,
    lm_head_is_pretrained,
    load_task_model,
    pick_device,
    set_seed,
    train,
)
from lmprune.models import ModelSourceError
from lmprune.pruning import prunable_weights, prune_model
from lmprune.toy import TOY_FAMILIES

CPU = torch.device("cpu")
LOG = logging.getLogger("test_finetune")

CLM_CLASSES = {"decoder": "GPT2LMHeadModel", "encoder-decoder": "BartForCausalLM", "encoder": "BertLMHeadModel"}
QNLI_CLASSES = {
    "decoder": "GPT2ForSequenceClassification",
    "encoder-decoder": "BartForSequenceClassification",
    "encoder": "BertForSequenceClassification",
}
QNLI_HEAD_WEIGHTS = {
    "decoder": "score.weight",
    "encoder-decoder": "classification_head.out_proj.weight",
    "encoder": "classifier.weight",
}


def token_loader(vocab_size, num_samples=6, length=16, batch_size=2, seed=0, labels="tokens"):
    """Return a DataLoader of random token batches, labelled by the tokens (CLM) or by 0/1 (QNLI)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        input_ids = torch.randint(0, vocab_size, (length,), generator=generator)
        sample = {"input_ids": input_ids, "attention_mask": torch.ones(length, dtype=torch.long)}
        if labels == "tokens":
            sample["labels"] = input_ids.clone()
        else:
            sample["labels"] = torch.randint(0, 2, (), generator=generator)
        samples.append(sample)
    return DataLoader(samples, batch_size=batch_size)


def weight_copies(model):
    return {name: weight.detach().clone() for name, weight in prunable_weights(model)}


def pruned_toy(toy_models, family, task="clm"):
    """Load a toy model for ``task``, prune half of its weights and return (model, zeros after pruning)."""
    model, _ = load_task_model(toy_models[family], task, family)
    report = prune_model(model, "magnitude", 0.5)
    zeros = sum(entry["zeros"] for entry in report.tensors)
    assert zeros >= report.num_pruned
    return model, zeros


# --- SparsityMasks and train ------------------------------------------------------------------


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_masks_keep_zeros_through_training(toy_models, family):
    model, zeros_after_pruning = pruned_toy(toy_models, family)
    masks = SparsityMasks.from_model(model)
    assert masks.num_zeros() == zeros_after_pruning
    before = weight_copies(model)

    result = train(
        model, token_loader(model.config.vocab_size), epochs=2, learning_rate=1e-2,
        device=CPU, masks=masks, log=LOG, progress=False,
    )

    assert result.steps == 6
    assert masks.num_zeros() == zeros_after_pruning
    assert masks.sparsity() == zeros_after_pruning / masks.num_weights()
    moved = 0
    unpruned = 0
    for name, weight in prunable_weights(model):
        assert torch.equal(weight == 0, before[name] == 0), name
        moved += int(((weight != before[name]) & (before[name] != 0)).sum())
        unpruned += int((before[name] != 0).sum())
    # The step is large enough that most unpruned weights move (unused embedding rows do not).
    assert moved > unpruned // 2


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_training_without_masks_loses_zeros(toy_models, family):
    model, zeros_after_pruning = pruned_toy(toy_models, family)
    train(
        model, token_loader(model.config.vocab_size), epochs=1, learning_rate=1e-2,
        device=CPU, masks=None, log=LOG, progress=False,
    )
    zeros_after_training = sum(int((weight == 0).sum()) for _, weight in prunable_weights(model))
    assert zeros_after_training < zeros_after_pruning


def test_masks_keep_zeros_training_classifier(toy_models):
    model, zeros_after_pruning = pruned_toy(toy_models, "encoder", task="qnli")
    masks = SparsityMasks.from_model(model)
    train(
        model, token_loader(model.config.vocab_size, labels="binary"), epochs=1, learning_rate=1e-2,
        device=CPU, masks=masks, log=LOG, progress=False,
    )
    assert masks.num_zeros() == zeros_after_pruning


def test_masks_memory_one_byte_per_weight(toy_models):
    model, _ = pruned_toy(toy_models, "decoder")
    masks = SparsityMasks.from_model(model)
    assert masks.num_weights() == sum(weight.numel() for _, weight in prunable_weights(model))
    assert masks.memory_bytes <= masks.num_weights()


def test_tied_gpt2_head_stays_tied(toy_models):
    model, _ = pruned_toy(toy_models, "decoder")
    # Both names of the tied weight: the masks must track it once.
    named = [(name, weight) for name, weight in model.named_parameters(remove_duplicate=False) if name.endswith(("wte.weight", "lm_head.weight"))]
    assert len(named) == 2
    masks = SparsityMasks.from_model(model, named)
    assert masks.names == ["transformer.wte.weight"]
    assert masks.num_weights() == model.transformer.wte.weight.numel()

    train(
        model, token_loader(model.config.vocab_size), epochs=1, learning_rate=1e-2,
        device=CPU, masks=masks, log=LOG, progress=False,
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_masks_reject_foreign_parameter():
    model = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        SparsityMasks.from_model(model, [("other.weight", other.weight)])


def test_masks_hook_runs_after_every_step():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight[:, :4] = 0
    masks = SparsityMasks.from_model(layer, [("weight", layer.weight)])
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    handle = masks.hook_optimizer(optimizer)

    for _ in range(3):
        layer(torch.randn(5, 8)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert masks.num_zeros() == 32

    handle.remove()
    layer(torch.randn(5, 8)).square().sum().backward()
    optimizer.step()
    assert masks.num_zeros() < 32


def test_train_result_counts(toy_models):
    model, _ = load_task_model(toy_models["decoder"], "clm", "decoder")
    result = train(
        model, token_loader(model.config.vocab_size, num_samples=5), epochs=3, learning_rate=1e-3,
        warmup_ratio=0.5, weight_decay=0.01, device=CPU, masks=None, log=LOG, progress=False,
    )
    assert result.epochs == 3
    assert result.steps == 9  # batches of 2, 2 and 1 per epoch
    assert result.train_samples == 15
    assert result.train_runtime_s > 0
    assert result.train_samples_per_s == pytest.approx(15 / result.train_runtime_s)
    assert math.isfinite(result.final_train_loss)
    assert math.isfinite(result.mean_train_loss)
    assert model.training


def test_train_logs_one_line_per_epoch(toy_models, caplog):
    model, _ = load_task_model(toy_models["decoder"], "clm", "decoder")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        train(
            model, token_loader(model.config.vocab_size), epochs=2, learning_rate=1e-3,
            device=CPU, masks=None, log=LOG, progress=False,
        )
    epoch_lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert epoch_lines[0].startswith("epoch 1/2: mean loss ")
    assert "samples/s" in epoch_lines[1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_train_rejects_bad_arguments(arguments, message):
    model = nn.Linear(2, 2)
    settings = {"epochs": 1, "learning_rate": 1e-3, **arguments}
    with pytest.raises(ValueError, match=message):
        train(model, DataLoader([]), device=CPU, masks=None, log=LOG, progress=False, **settings)


def test_train_rejects_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        train(nn.Linear(2, 2), DataLoader([]), epochs=1, learning_rate=1e-3, device=CPU, masks=None, log=LOG)


def test_train_rejects_batch_without_labels(toy_models):
    model, _ = load_task_model(toy_models["decoder"], "clm", "decoder")
    loader = DataLoader([{"input_ids": torch.zeros(8, dtype=torch.long)}] * 2, batch_size=2)
    with pytest.raises(ValueError, match="no 'labels'"):
        train(model, loader, epochs=1, learning_rate=1e-3, device=CPU, masks=None, log=LOG, progress=False)


# --- evaluate_causal_lm -----------------------------------------------------------------------


class BigramStub(nn.Module):
    """Returns logits log P[x] at a position with token x, so P(next = y) is P[x, y]."""

    def __init__(self, probabilities):
        super().__init__()
        self.log_probabilities = torch.log(torch.tensor(probabilities))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.log_probabilities[input_ids])


BIGRAM = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]
BLOCKS = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1], [1, 1, 2, 0]])
# The next-token pairs inside each block; no pair crosses from one block into the next.
BLOCK_LOSSES = [
    [-math.log(0.25), -math.log(0.3), -math.log(0.6)],
    [-math.log(0.2), -math.log(0.5), -math.log(0.25)],
    [-math.log(0.6), -math.log(0.3), -math.log(0.2)],
]
EXPECTED_LOSS = sum(map(sum, BLOCK_LOSSES)) / 9


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_causal_lm_loss_by_hand(batch_size):
    result = evaluate_causal_lm(BigramStub(BIGRAM), BLOCKS, batch_size=batch_size, device=CPU)
    assert result.eval_loss == pytest.approx(EXPECTED_LOSS, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.eval_loss), rel=1e-12)
    assert result.eval_tokens == 3 * (4 - 1)
    assert result.eval_blocks == 3
    assert result.block_size == 4
    assert result.eval_runtime_s >= 0


def test_causal_lm_per_token_mean():
    # With batch_size 2 the batches contain 2 and 1 blocks, so a mean of batch means weighs the
    # last block double. The hand values differ enough for the check above to catch that.
    first_batch = sum(BLOCK_LOSSES[0] + BLOCK_LOSSES[1]) / 6
    second_batch = sum(BLOCK_LOSSES[2]) / 3
    mean_of_batch_means = (first_batch + second_batch) / 2
    assert abs(mean_of_batch_means - EXPECTED_LOSS) > 1e-3
    result = evaluate_causal_lm(BigramStub(BIGRAM), BLOCKS, batch_size=2, device=CPU)
    assert result.eval_loss != pytest.approx(mean_of_batch_means, rel=1e-4)


def test_causal_lm_loss_matches_model_loss(toy_models):
    model, _ = load_task_model(toy_models["decoder"], "clm", "decoder")
    blocks = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()
    result = evaluate_causal_lm(model, blocks, batch_size=3, device=CPU)
    assert result.eval_loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "blocks, message",
    [
        (torch.tensor([0, 1, 2]), "2-D"),
        (torch.zeros(2, 4), "integer"),
        (torch.zeros(2, 1, dtype=torch.long), "at least 2 tokens"),
        (torch.zeros(0, 4, dtype=torch.long), "at least one block"),
    ],
)
def test_causal_lm_rejects_bad_blocks(blocks, message):
    with pytest.raises(ValueError, match=message):
        evaluate_causal_lm(BigramStub(BIGRAM), blocks, batch_size=2, device=CPU)


def test_causal_lm_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_causal_lm(BigramStub(BIGRAM), BLOCKS, batch_size=0, device=CPU)


def test_causal_lm_rejects_wrong_logits():
    class FlatStub(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 3))

    with pytest.raises(ValueError, match="expected \\[batch, block_size, vocab\\]"):
        evaluate_causal_lm(FlatStub(), BLOCKS, batch_size=2, device=CPU)


# --- evaluate_classification ------------------------------------------------------------------


class FirstTokenClassifier(nn.Module):
    """Returns the logits row of each sample's first token id."""

    def __init__(self, logits_by_token):
        super().__init__()
        self.logits_by_token = torch.tensor(logits_by_token)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits_by_token[input_ids[:, 0]])


def test_classification_accuracy_by_hand():
    # Token 0 predicts label 0, tokens 1 and 2 predict label 1.
    model = FirstTokenClassifier([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    first_tokens = [0, 1, 2, 0, 2]
    labels = [0, 1, 0, 1, 1]  # correct, correct, wrong, wrong, correct
    samples = [
        {"input_ids": torch.tensor([token, 0, 0]), "attention_mask": torch.ones(3, dtype=torch.long), "labels": torch.tensor(label)}
        for token, label in zip(first_tokens, labels)
    ]
    result = evaluate_classification(model, DataLoader(samples, batch_size=2), device=CPU)

    assert result.accuracy == pytest.approx(3 / 5)
    assert result.eval_samples == 5
    # Two-class cross-entropy is log(1 + exp(other logit - label logit)), averaged over samples.
    expected_loss = (
        math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(2))
        + math.log1p(math.exp(2)) + math.log1p(math.exp(-2))
    ) / 5
    assert result.eval_loss == pytest.approx(expected_loss, rel=1e-6)


def test_classification_rejects_missing_labels():
    model = FirstTokenClassifier([[1.0, 0.0]])
    loader = DataLoader([{"input_ids": torch.zeros(3, dtype=torch.long)}], batch_size=1)
    with pytest.raises(ValueError, match="no 'labels'"):
        evaluate_classification(model, loader, device=CPU)


def test_classification_rejects_empty_loader():
    with pytest.raises(ValueError, match="no samples"):
        evaluate_classification(FirstTokenClassifier([[1.0, 0.0]]), DataLoader([]), device=CPU)


# --- load_task_model --------------------------------------------------------------------------


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_load_clm_classes(toy_models, family):
    model, new_parameter_names = load_task_model(toy_models[family], "clm", family)
    assert type(model).__name__ == CLM_CLASSES[family]
    assert new_parameter_names == set()
    assert lm_head_is_pretrained(model, new_parameter_names)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    if family == "encoder":
        assert model.config.is_decoder


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_load_clm_is_causal(toy_models, family):
    model, _ = load_task_model(toy_models[family], "clm", family)
    input_ids = torch.randint(5, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        changed_logits = model(input_ids=changed).logits
    # Changing the last token must not change the predictions made before it.
    torch.testing.assert_close(changed_logits[:, :-1], logits[:, :-1])


def test_load_bart_clm_reads_shared_embedding(toy_models):
    folder = toy_models["encoder-decoder"]
    stored = load_file(folder / "model.safetensors")
    assert "model.decoder.embed_tokens.weight" not in stored
    model, _ = load_task_model(folder, "clm", "encoder-decoder")
    assert torch.equal(model.model.decoder.embed_tokens.weight, stored["model.shared.weight"])
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_load_qnli_classes(toy_models, family):
    model, new_parameter_names = load_task_model(toy_models[family], "qnli", family)
    assert type(model).__name__ == QNLI_CLASSES[family]
    assert model.config.num_labels == 2
    assert model.config.id2label == QNLI_LABELS
    assert model.config.label2id == {"entailment": 0, "not_entailment": 1}
    assert QNLI_HEAD_WEIGHTS[family] in new_parameter_names
    assert model.config.pad_token_id is not None
    with pytest.raises(ValueError, match="no output embedding"):
        lm_head_is_pretrained(model, new_parameter_names)


def test_load_gpt2_qnli_pads_with_eos(toy_models):
    model, _ = load_task_model(toy_models["decoder"], "qnli", "decoder")
    assert model.config.pad_token_id == model.config.eos_token_id


def test_load_minilm_clm_head_is_new(minilm_folder):
    model, new_parameter_names = load_task_model(minilm_folder, "clm", "encoder")
    assert type(model).__name__ == "BertLMHeadModel"
    assert model.config.is_decoder
    assert "cls.predictions.transform.dense.weight" in new_parameter_names
    assert "bert.embeddings.word_embeddings.weight" not in new_parameter_names
    assert not lm_head_is_pretrained(model, new_parameter_names)


def test_load_minilm_qnli_new_classifier(minilm_folder):
    model, new_parameter_names = load_task_model(minilm_folder, "qnli", "encoder")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert new_parameter_names == {"classifier.weight", "classifier.bias"}


def test_load_rejects_bad_arguments(toy_models, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        load_task_model(toy_models["decoder"], "mlm", "decoder")
    with pytest.raises(ValueError, match="unknown model family"):
        load_task_model(toy_models["decoder"], "clm", "gpt")
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_task_model(tmp_path, "clm", "decoder")


# --- pick_device and set_seed -----------------------------------------------------------------


def test_pick_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")
    assert pick_device("auto") == CPU
    assert pick_device("cpu") == CPU


@pytest.mark.parametrize("requested", ["tpu", "gpu0", "mps"])
def test_pick_device_rejects_unknown(requested):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        pick_device(requested)


def test_set_seed_repeats_draws():
    set_seed(3)
    first = (random.random(), torch.rand(3))
    set_seed(3)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="seed"):
        set_seed(-1)
