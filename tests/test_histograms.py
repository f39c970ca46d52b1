import json

import matplotlib.image
import numpy as np
import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartModel,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

import lmprune.histograms as histograms
from lmprune.histograms import (
    DEFAULT_BINS,
    WeightHistograms,
    layer_grid,
    layer_of,
    plot_layer_histograms,
    plot_model_histogram,
    weight_histograms,
)

LAYERS = 2


def _gpt2_config(layers=LAYERS):
    return GPT2Config(
        n_layer=layers, n_embd=16, n_head=2, vocab_size=64, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )


def _bart_config():
    return BartConfig(
        encoder_layers=LAYERS, decoder_layers=LAYERS, d_model=16,
        encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, max_position_embeddings=32,
    )


def _bert_config():
    return BertConfig(
        num_hidden_layers=LAYERS, hidden_size=16, num_attention_heads=2,
        intermediate_size=32, vocab_size=64, max_position_embeddings=32,
    )


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "gpt2_lm": GPT2LMHeadModel(_gpt2_config()),
        "gpt2": GPT2Model(_gpt2_config()),
        "bart_lm": BartForConditionalGeneration(_bart_config()),
        "bart": BartModel(_bart_config()),
        "bert_mlm": BertForMaskedLM(_bert_config()),
        "bert": BertModel(_bert_config()),
    }


def _state_names(model):
    # state_dict keeps tied weights such as lm_head.weight, which named_parameters drops.
    return list(model.state_dict())


def _matrices(model):
    return [(name, p.detach().clone()) for name, p in model.named_parameters() if p.dim() == 2]


def _prune_smallest(tensor, fraction):
    pruned = tensor.clone()
    flat = pruned.view(-1)
    flat[flat.abs().argsort()[: int(fraction * flat.numel())]] = 0.0
    return pruned


# layer_of


@pytest.mark.parametrize(
    ("model_key", "expected_stacks"),
    [
        ("gpt2_lm", {"decoder"}),
        ("gpt2", {"decoder"}),
        ("bart_lm", {"encoder", "decoder"}),
        ("bart", {"encoder", "decoder"}),
        ("bert_mlm", {"encoder"}),
        ("bert", {"encoder"}),
    ],
)
def test_layer_of_finds_every_layer(models, model_key, expected_stacks):
    keys = {layer_of(name) for name in _state_names(models[model_key])} - {None}

    assert keys == {(stack, i) for stack in expected_stacks for i in range(LAYERS)}


@pytest.mark.parametrize(
    ("model_key", "name", "expected"),
    [
        ("gpt2_lm", "transformer.h.1.attn.c_attn.weight", ("decoder", 1)),
        ("gpt2_lm", "transformer.wte.weight", None),
        ("gpt2_lm", "transformer.wpe.weight", None),
        ("gpt2_lm", "transformer.ln_f.weight", None),
        ("gpt2_lm", "lm_head.weight", None),
        ("gpt2", "h.0.mlp.c_fc.weight", ("decoder", 0)),
        ("bart_lm", "model.encoder.layers.1.fc1.weight", ("encoder", 1)),
        ("bart_lm", "model.decoder.layers.0.encoder_attn.q_proj.weight", ("decoder", 0)),
        ("bart_lm", "model.shared.weight", None),
        ("bart_lm", "model.encoder.embed_positions.weight", None),
        ("bart_lm", "model.decoder.layernorm_embedding.weight", None),
        ("bart_lm", "lm_head.weight", None),
        ("bart", "decoder.layers.1.fc2.weight", ("decoder", 1)),
        ("bert_mlm", "bert.encoder.layer.1.attention.self.query.weight", ("encoder", 1)),
        ("bert_mlm", "bert.embeddings.word_embeddings.weight", None),
        ("bert_mlm", "cls.predictions.transform.dense.weight", None),
        ("bert", "encoder.layer.0.output.dense.weight", ("encoder", 0)),
        ("bert", "pooler.dense.weight", None),
    ],
)
def test_layer_of_real_names(models, model_key, name, expected):
    assert name in _state_names(models[model_key])
    assert layer_of(name) == expected


def test_layer_of_multi_digit_index():
    assert layer_of("transformer.h.23.mlp.c_proj.weight") == ("decoder", 23)
    assert layer_of("model.encoder.layers.11.fc1.weight") == ("encoder", 11)


def test_layer_of_needs_full_segment():
    assert layer_of("transformer.hx.1.weight") is None
    assert layer_of("encoder.layer.x.weight") is None


# weight_histograms


def test_counts_sum_to_numel(models):
    weights = _matrices(models["bart_lm"])

    h = weight_histograms(weights)

    total = sum(t.numel() for _, t in weights)
    assert h.model.numel == total
    assert h.model.counts.sum() == total
    assert h.model.underflow == 0
    assert h.model.overflow == 0
    assert h.model.tensors == len(weights)
    assert h.model.counts.dtype == np.int64


def test_layer_numel_and_zeros(models):
    weights = [(name, _prune_smallest(t, 0.5)) for name, t in _matrices(models["bart_lm"])]

    h = weight_histograms(weights)

    for key, counts in h.layers.items():
        tensors = [t for name, t in weights if layer_of(name) == key]
        assert counts.numel == sum(t.numel() for t in tensors)
        assert counts.zeros == sum(int((t == 0).sum()) for t in tensors)
        assert counts.counts.sum() == counts.numel
    outside = [t for name, t in weights if layer_of(name) is None]
    assert h.outside_layers.numel == sum(t.numel() for t in outside)
    assert sum(c.numel for c in h.layers.values()) + h.outside_layers.numel == h.model.numel
    assert np.array_equal(
        sum(c.counts for c in h.layers.values()) + h.outside_layers.counts, h.model.counts
    )


def test_layers_in_stack_order(models):
    h = weight_histograms(_matrices(models["bart_lm"]))

    assert list(h.layers) == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]
    assert h.stacks == ["encoder", "decoder"]


def test_zero_bin_catches_pruned_zeros():
    generator = torch.Generator().manual_seed(1)
    tensor = _prune_smallest(torch.randn(300, 200, generator=generator), 0.7)
    zeros = int((tensor == 0).sum())

    h = weight_histograms([("transformer.h.0.mlp.c_fc.weight", tensor)])

    zero_bin = DEFAULT_BINS // 2
    assert h.bin_edges[zero_bin] < 0.0 < h.bin_edges[zero_bin + 1]
    assert h.bin_edges[zero_bin] == pytest.approx(-h.bin_edges[zero_bin + 1])
    assert h.model.zeros == zeros
    assert h.model.counts[zero_bin] >= zeros
    # Magnitude pruning removed the small values, so the zero bin holds only zeros.
    assert h.model.counts[zero_bin] == zeros


def test_matches_numpy_histogram():
    generator = torch.Generator().manual_seed(2)
    tensor = torch.randn(1000, 37, generator=generator)

    h = weight_histograms([("w", tensor)], bins=51)

    expected, edges = np.histogram(tensor.numpy().astype(np.float64), bins=h.bin_edges)
    assert np.array_equal(h.model.counts, expected)
    assert h.value_range == (-float(tensor.abs().max()), float(tensor.abs().max()))


def test_explicit_range_counts_outside_values():
    tensor = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0])

    h = weight_histograms([("w", tensor)], bins=4, value_range=(-1.0, 1.0))

    assert h.value_range == (-1.0, 1.0)
    # Bins are [-1, -0.5), [-0.5, 0), [0, 0.5), [0.5, 1], and the last one includes 1.0.
    assert h.model.counts.tolist() == [1, 1, 1, 2]
    assert h.model.underflow == 1
    assert h.model.overflow == 2
    assert h.model.counts.sum() + h.model.underflow + h.model.overflow == tensor.numel()


def test_chunking_does_not_change_counts(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    tensor = _prune_smallest(torch.randn(100, 103, generator=generator), 0.4)
    whole = weight_histograms([("w", tensor)])

    monkeypatch.setattr(histograms, "_CHUNK_ELEMENTS", 1000)
    chunked = weight_histograms([("w", tensor)])

    assert np.array_equal(chunked.model.counts, whole.model.counts)
    assert chunked.model.zeros == whole.model.zeros


def test_half_precision_weights():
    generator = torch.Generator().manual_seed(4)
    tensor = _prune_smallest(torch.randn(64, 64, generator=generator), 0.5)

    h = weight_histograms([("w", tensor.to(torch.bfloat16)), ("v", tensor.half())])

    assert h.model.numel == 2 * tensor.numel()
    assert h.model.zeros == 2 * int((tensor == 0).sum())
    assert h.model.counts.sum() == h.model.numel


def test_inputs_not_modified(models):
    weights = _matrices(models["gpt2_lm"])
    before = [t.clone() for _, t in weights]

    weight_histograms(weights)

    assert all(torch.equal(t, b) for (_, t), b in zip(weights, before))


def test_accepts_iterator(models):
    weights = _matrices(models["bert_mlm"])

    from_iterator = weight_histograms(iter(weights))
    from_list = weight_histograms(weights)

    assert np.array_equal(from_iterator.model.counts, from_list.model.counts)
    assert from_iterator.value_range == from_list.value_range


def test_all_zero_weights():
    h = weight_histograms([("w", torch.zeros(10, 10))], bins=5)

    assert h.value_range == (-1.0, 1.0)
    assert h.model.counts.tolist() == [0, 0, 100, 0, 0]


def test_nan_weight_rejected():
    tensor = torch.ones(4, 4)
    tensor[1, 2] = float("nan")

    with pytest.raises(ValueError, match="tensor 'encoder.layer.0.w' contains 1 NaN or infinite"):
        weight_histograms([("encoder.layer.0.w", tensor)])


def test_inf_weight_rejected_with_explicit_range():
    tensor = torch.ones(4, 4)
    tensor[0, 0] = float("inf")

    with pytest.raises(ValueError, match="tensor 'w' contains 1 NaN or infinite"):
        weight_histograms([("w", tensor)], value_range=(-1.0, 1.0))


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_invalid_bins_rejected(bins):
    with pytest.raises(ValueError, match="invalid bins"):
        weight_histograms([("w", torch.ones(3))], bins=bins)


@pytest.mark.parametrize("value_range", [(1.0, 1.0), (1.0, -1.0), (0.0, float("inf"))])
def test_invalid_value_range_rejected(value_range):
    with pytest.raises(ValueError, match="invalid value_range"):
        weight_histograms([("w", torch.ones(3))], value_range=value_range)


def test_to_dict_round_trip(models):
    h = weight_histograms(_matrices(models["bart_lm"]), bins=11)

    data = json.loads(json.dumps(h.to_dict()))
    restored = WeightHistograms.from_dict(data)

    assert data["bins"] == 11
    assert len(data["bin_edges"]) == 12
    assert data["layers"][0]["stack"] == "encoder"
    assert data["layers"][0]["index"] == 0
    assert restored.value_range == h.value_range
    assert np.array_equal(restored.model.counts, h.model.counts)
    assert list(restored.layers) == list(h.layers)
    assert restored.layers == h.layers
    assert restored.outside_layers == h.outside_layers
    assert restored.model == h.model


# layer_grid and plots


@pytest.mark.parametrize(
    ("layer_count", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (6, (1, 6)), (12, (2, 6)), (24, (4, 6)), (36, (6, 6)), (48, (7, 7))],
)
def test_layer_grid_single_stack(layer_count, shape):
    grid = layer_grid([("decoder", i) for i in range(layer_count)])

    assert (grid.rows, grid.columns) == shape
    assert len(set(grid.positions.values())) == layer_count
    assert grid.positions[("decoder", 0)] == (0, 0)


def test_layer_grid_stacks_on_own_rows():
    keys = [("decoder", i) for i in range(12)] + [("encoder", i) for i in range(12)]

    grid = layer_grid(keys)

    assert (grid.rows, grid.columns) == (4, 6)
    assert grid.positions[("encoder", 0)] == (0, 0)
    assert grid.positions[("encoder", 11)] == (1, 5)
    assert grid.positions[("decoder", 0)] == (2, 0)
    assert grid.positions[("decoder", 11)] == (3, 5)


def test_layer_grid_uneven_stacks():
    keys = [("encoder", i) for i in range(8)] + [("decoder", i) for i in range(3)]

    grid = layer_grid(keys)

    assert grid.columns == 6
    assert grid.positions[("encoder", 7)] == (1, 1)
    assert grid.positions[("decoder", 0)] == (2, 0)
    assert grid.rows == 3


def _image_shape(path):
    image = matplotlib.image.imread(path)
    return image.shape


def test_plot_model_histogram_png(tmp_path, models):
    weights = [(name, _prune_smallest(t, 0.5)) for name, t in _matrices(models["gpt2_lm"])]
    h = weight_histograms(weights)
    path = tmp_path / "model.png"

    plot_model_histogram(h, path, "gpt2-tiny, magnitude, 50% sparsity")

    height, width, channels = _image_shape(path)
    assert width > height > 300
    assert channels in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["model.png"]


def test_plot_layer_histograms_bart(tmp_path, models):
    h = weight_histograms(_matrices(models["bart_lm"]))
    path = tmp_path / "layers.png"

    plot_layer_histograms(h, path, "bart-tiny, dense")

    height, width, _ = _image_shape(path)
    assert height > 300
    assert width > 300


def test_plot_layer_histograms_24_layers(tmp_path):
    torch.manual_seed(5)
    model = GPT2LMHeadModel(_gpt2_config(layers=24))
    h = weight_histograms(_matrices(model), bins=51)
    path = tmp_path / "layers24.png"

    plot_layer_histograms(h, path, "gpt2-24-layer, dense")

    height, width, _ = _image_shape(path)
    assert len(h.layers) == 24
    # 4 rows of 6 panels: wider than tall.
    assert 1.2 < width / height < 2.5


def test_plot_layer_histograms_without_layers(tmp_path):
    h = weight_histograms([("embeddings.word_embeddings.weight", torch.ones(4, 4))])

    with pytest.raises(ValueError, match="no parameter name matched"):
        plot_layer_histograms(h, tmp_path / "layers.png", "title")

    assert not list(tmp_path.iterdir())
