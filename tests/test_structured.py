"""Tests for lmprune.structured on small untrained GPT-2, BART and BERT models, hand-made FFNs and the real MiniLM."""

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BartConfig, BartForConditionalGeneration, RobertaConfig, RobertaModel
from transformers.pytorch_utils import Conv1D

from lmprune.models import auto_class_for, load_model
from lmprune.structured import (
    HEADS_NOT_PRUNED_REASON,
    FfnBlock,
    ffn_blocks,
    neuron_importance,
    prune_ffn_,
    select_neurons,
    shrink_block_,
)

FAMILIES = ("decoder", "encoder-decoder", "encoder")

# The config attributes of each toy family's FFN widths, and the layer names in module order.
STACKS = {
    "decoder": {"n_inner": ["transformer.h.0", "transformer.h.1"]},
    "encoder-decoder": {
        "encoder_ffn_dim": ["model.encoder.layers.0", "model.encoder.layers.1"],
        "decoder_ffn_dim": ["model.decoder.layers.0", "model.decoder.layers.1"],
    },
    "encoder": {"intermediate_size": ["bert.encoder.layer.0", "bert.encoder.layer.1"]},
}

UP_DOWN_PATHS = {
    "decoder": ("mlp.c_fc", "mlp.c_proj"),
    "encoder-decoder": ("fc1", "fc2"),
    "encoder": ("intermediate.dense", "output.dense"),
}

TOY_WIDTH = 256  # 4 * hidden_size of lmprune.toy's default models
TOY_HIDDEN = 64


def config_width(config, stack: str) -> int:
    width = getattr(config, stack)
    return 4 * config.n_embd if stack == "n_inner" and width is None else width


def sample_input_ids(model: nn.Module, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, model.config.vocab_size, (2, 12), generator=generator)


@torch.no_grad()
def model_output(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def reload_with_stock_transformers(model: nn.Module, folder):
    """Save ``model`` and load it back with its Auto class, returning (model, loading info)."""
    model.save_pretrained(folder)
    auto_class = auto_class_for(AutoConfig.from_pretrained(folder))
    reloaded, info = auto_class.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    return reloaded.eval(), info


def linear_block(up_weight: torch.Tensor, down_weight: torch.Tensor) -> FfnBlock:
    """Build an FfnBlock of two nn.Linear with the given weights, in nn.Linear layout."""
    up = nn.Linear(up_weight.shape[1], up_weight.shape[0])
    down = nn.Linear(down_weight.shape[1], down_weight.shape[0])
    with torch.no_grad():
        up.weight.copy_(up_weight)
        down.weight.copy_(down_weight)
    return FfnBlock("layer", "intermediate_size", up, down)


def conv1d_block(up_weight: torch.Tensor, down_weight: torch.Tensor) -> FfnBlock:
    """Build an FfnBlock of two Conv1D with the given weights, given in nn.Linear layout."""
    up = Conv1D(up_weight.shape[0], up_weight.shape[1])
    down = Conv1D(down_weight.shape[0], down_weight.shape[1])
    with torch.no_grad():
        up.weight.copy_(up_weight.t())
        down.weight.copy_(down_weight.t())
    return FfnBlock("layer", "n_inner", up, down)


# Three neurons, hidden size 2. Up rows have norms 1, 2, 3 and down columns norms 4, 1, 1.
HAND_UP = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
HAND_DOWN = torch.tensor([[4.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_blocks_layer_order(toy_models, family):
    model = load_model(toy_models[family])
    blocks = ffn_blocks(model)

    expected = [(stack, name) for stack, names in STACKS[family].items() for name in names]
    assert [(block.stack, block.name) for block in blocks] == expected
    assert all(block.width == TOY_WIDTH for block in blocks)
    up_path, down_path = UP_DOWN_PATHS[family]
    for block in blocks:
        assert block.up is model.get_submodule(f"{block.name}.{up_path}")
        assert block.down is model.get_submodule(f"{block.name}.{down_path}")


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_half_reloads_with_same_outputs(toy_models, family, tmp_path):
    model = load_model(toy_models[family])
    parameters_before = sum(parameter.numel() for parameter in model.parameters())
    report = prune_ffn_(model, 0.5)

    for stack, names in STACKS[family].items():
        assert config_width(model.config, stack) == TOY_WIDTH // 2
        assert report["stacks"][stack] == {"width_before": TOY_WIDTH, "width_after": TOY_WIDTH // 2, "layers": names}
    assert all(block.width == TOY_WIDTH // 2 for block in ffn_blocks(model))

    num_layers = sum(len(names) for names in STACKS[family].values())
    removed = num_layers * (TOY_WIDTH // 2) * (2 * TOY_HIDDEN + 1)
    assert report["parameters_before"] == parameters_before
    assert report["parameters_after"] == parameters_before - removed
    assert report["neurons_removed_fraction"] == 0.5
    assert report["heads"] == {"pruned": False, "reason": HEADS_NOT_PRUNED_REASON}
    assert json.loads(json.dumps(report)) == report

    reloaded, info = reload_with_stock_transformers(model, tmp_path / "pruned")
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert type(reloaded) is type(model)
    for stack in STACKS[family]:
        assert config_width(reloaded.config, stack) == TOY_WIDTH // 2
    assert sum(parameter.numel() for parameter in reloaded.parameters()) == report["parameters_after"]

    input_ids = sample_input_ids(model)
    torch.testing.assert_close(model_output(reloaded, input_ids), model_output(model, input_ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_zeroed_neurons_keeps_outputs(toy_models, family):
    model = load_model(toy_models[family])
    input_ids = sample_input_ids(model)
    generator = torch.Generator().manual_seed(1)
    num_zeroed = TOY_WIDTH // 4

    # Zero the down-projection weights of a different random set of neurons in every layer, so
    # those neurons add exactly nothing and have importance 0.
    blocks = ffn_blocks(model)
    expected_up_rows = []
    with torch.no_grad():
        for block in blocks:
            zeroed = torch.randperm(TOY_WIDTH, generator=generator)[:num_zeroed]
            down_columns = block.down.weight if family == "decoder" else block.down.weight.t()
            down_columns[zeroed] = 0
            kept_mask = torch.ones(TOY_WIDTH, dtype=torch.bool)
            kept_mask[zeroed] = False
            up_rows = block.up.weight.t() if family == "decoder" else block.up.weight
            expected_up_rows.append(up_rows[kept_mask].clone())
    parameters_before = sum(parameter.numel() for parameter in model.parameters())
    output_before = model_output(model, input_ids)

    report = prune_ffn_(model, num_zeroed / TOY_WIDTH)

    # Each neuron removes one up row (hidden weights), one up bias and one down column (hidden weights).
    removed = len(blocks) * num_zeroed * (TOY_HIDDEN + 1 + TOY_HIDDEN)
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters_before - removed
    assert report["parameters_after"] == parameters_before - removed
    for block, expected in zip(ffn_blocks(model), expected_up_rows):
        up_rows = block.up.weight.t() if family == "decoder" else block.up.weight
        assert torch.equal(up_rows, expected), block.name
    torch.testing.assert_close(model_output(model, input_ids), output_before, rtol=1e-5, atol=1e-5)


def test_importance_from_weight_norms():
    importance = neuron_importance(linear_block(HAND_UP, HAND_DOWN))

    assert importance.dtype == torch.float32
    assert importance.tolist() == [4.0, 2.0, 3.0]
    assert select_neurons(importance, 2).tolist() == [0, 2]


def test_importance_conv1d_matches_linear():
    torch.manual_seed(0)
    up_weight, down_weight = torch.randn(8, 5), torch.randn(5, 8)
    activation_norms = torch.rand(8)

    linear, conv = linear_block(up_weight, down_weight), conv1d_block(up_weight, down_weight)

    torch.testing.assert_close(neuron_importance(conv), neuron_importance(linear))
    torch.testing.assert_close(neuron_importance(conv, activation_norms), neuron_importance(linear, activation_norms))


def test_importance_from_activation_norms():
    block = linear_block(HAND_UP, HAND_DOWN)
    importance = neuron_importance(block, torch.tensor([0.1, 5.0, 2.0], dtype=torch.float64))

    torch.testing.assert_close(importance, torch.tensor([0.4, 5.0, 2.0]))
    assert select_neurons(importance, 2).tolist() == [1, 2]


def test_importance_equals_contribution_norm():
    torch.manual_seed(0)
    block = linear_block(torch.randn(6, 4), torch.randn(4, 6))
    activations = torch.randn(30, 6)  # 30 calibration tokens after the activation function

    importance = neuron_importance(block, torch.linalg.vector_norm(activations, dim=0))

    # The term neuron j adds to the down projection's output on all tokens is outer(a_j, d_j).
    for j in range(6):
        contribution = torch.outer(activations[:, j], block.down.weight[:, j].detach())
        torch.testing.assert_close(importance[j], torch.linalg.matrix_norm(contribution))


def test_select_neurons_ties_keep_lower_index():
    importance = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 3.0])

    assert select_neurons(importance, 2).tolist() == [1, 2]
    assert select_neurons(importance, 3).tolist() == [1, 2, 4]
    assert select_neurons(torch.zeros(4), 2).tolist() == [0, 1]


@pytest.mark.parametrize("num_kept", [0, 7, 1.0, True])
def test_select_neurons_bad_count_raises(num_kept):
    with pytest.raises(ValueError, match="num_kept must be an integer from 1 to 6"):
        select_neurons(torch.ones(6), num_kept)


@pytest.mark.parametrize("make_block", [linear_block, conv1d_block])
def test_shrink_block_keeps_selected_neurons(make_block):
    torch.manual_seed(0)
    up_weight, down_weight = torch.randn(6, 4), torch.randn(4, 6)
    block = make_block(up_weight, down_weight)
    up_bias = block.up.bias.detach().clone()
    down_bias = block.down.bias.detach().clone()
    x = torch.randn(3, 4)
    keep = torch.tensor([0, 2, 5])

    # The reference FFN on the kept neurons only, with GELU between the projections.
    hidden = torch.nn.functional.gelu(x @ up_weight[keep].t() + up_bias[keep])
    expected = hidden @ down_weight[:, keep].t() + down_bias

    shrink_block_(block, keep)

    assert block.width == 3
    if isinstance(block.up, Conv1D):
        assert (block.up.nf, block.up.nx, block.down.nf, block.down.nx) == (3, 4, 4, 3)
    else:
        assert (block.up.out_features, block.up.in_features) == (3, 4)
        assert (block.down.out_features, block.down.in_features) == (4, 3)
    assert torch.equal(block.down.bias.detach(), down_bias)
    assert block.up.weight.requires_grad
    with torch.no_grad():
        actual = block.down(torch.nn.functional.gelu(block.up(x)))
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (torch.tensor([], dtype=torch.long), "keep is empty"),
        (torch.tensor([2, 1]), "strictly increasing"),
        (torch.tensor([1, 1]), "strictly increasing"),
        (torch.tensor([0, 3]), "indices from 0 to 3, but layer 'layer' has 3 neurons"),
        (torch.tensor([-1, 0]), "indices from -1 to 0"),
        (torch.tensor([0.0, 1.0]), "1-D integer tensor"),
        (torch.tensor([[0, 1]]), "1-D integer tensor"),
        ([0, 1], "1-D integer tensor"),
    ],
)
def test_shrink_block_bad_keep_raises(keep, message):
    block = linear_block(HAND_UP, HAND_DOWN)
    with pytest.raises(ValueError, match=message):
        shrink_block_(block, keep)
    assert block.width == 3


def test_prune_uses_activation_norms(toy_models):
    model = load_model(toy_models["encoder"])
    blocks = ffn_blocks(model)
    # Layer 0: norms that cancel the down column norms, so importance rises with the index.
    # Layer 1: the odd neurons have norm 0, so exactly the even half keeps a nonzero importance.
    down_column_norms = torch.linalg.vector_norm(blocks[0].down.weight.detach(), dim=0)
    norms = {
        blocks[0].name: torch.arange(1, TOY_WIDTH + 1, dtype=torch.float32) / down_column_norms,
        blocks[1].name: (torch.arange(TOY_WIDTH) % 2 == 0).float(),
    }
    expected_kept = [torch.arange(TOY_WIDTH // 2, TOY_WIDTH), torch.arange(0, TOY_WIDTH, 2)]
    expected_rows = [block.up.weight.detach()[kept].clone() for block, kept in zip(blocks, expected_kept)]

    report = prune_ffn_(model, 0.5, activation_norms=norms)

    assert report["importance"] == "activation_norms"
    for block, expected in zip(ffn_blocks(model), expected_rows):
        assert torch.equal(block.up.weight.detach(), expected), block.name


def test_bart_stacks_keep_own_width():
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=100, d_model=16, encoder_layers=3, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=24, max_position_embeddings=32,
    )
    model = BartForConditionalGeneration(config).eval()

    report = prune_ffn_(model, 0.25)

    assert (model.config.encoder_ffn_dim, model.config.decoder_ffn_dim) == (30, 18)
    assert report["stacks"]["encoder_ffn_dim"]["width_after"] == 30
    assert report["stacks"]["decoder_ffn_dim"]["width_after"] == 18
    widths = [(block.stack, block.width) for block in ffn_blocks(model)]
    assert widths == [("encoder_ffn_dim", 30)] * 3 + [("decoder_ffn_dim", 18)] * 2
    assert report["neurons_before"] == 3 * 40 + 2 * 24
    assert report["neurons_after"] == 3 * 30 + 2 * 18


def test_prune_keeps_at_least_one_neuron():
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=3, decoder_ffn_dim=3, max_position_embeddings=32,
    )
    model = BartForConditionalGeneration(config).eval()

    prune_ffn_(model, 0.9)

    assert (model.config.encoder_ffn_dim, model.config.decoder_ffn_dim) == (1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_fraction_zero_is_noop(toy_models, family):
    model = load_model(toy_models[family])
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config_before = model.config.to_dict()

    report = prune_ffn_(model, 0.0)

    assert model.config.to_dict() == config_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[name], tensor) for name, tensor in state_before.items())
    assert report["parameters_after"] == report["parameters_before"]
    assert report["neurons_removed_fraction"] == 0.0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, math.nan, True, "0.5", None])
def test_prune_bad_fraction_raises(toy_models, fraction):
    model = load_model(toy_models["encoder"])
    with pytest.raises(ValueError, match=r"fraction must be .*in \[0, 1\)"):
        prune_ffn_(model, fraction)
    assert model.config.intermediate_size == TOY_WIDTH


def test_unsupported_model_raises():
    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match="RobertaModel has no FFN layers that structured pruning supports. Supported: BERT"):
        prune_ffn_(RobertaModel(config), 0.5)
    with pytest.raises(ValueError, match="Sequential has no FFN layers"):
        ffn_blocks(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)))


def test_config_width_mismatch_raises(toy_models):
    model = load_model(toy_models["encoder"])
    model.config.intermediate_size = 100

    with pytest.raises(ValueError, match="has 256 FFN neurons but config.intermediate_size is 100"):
        prune_ffn_(model, 0.5)
    assert all(block.width == TOY_WIDTH for block in ffn_blocks(model))


def test_submodel_without_config_attribute_raises(toy_models):
    wrapper = nn.Module()
    wrapper.config = object()
    wrapper.inner = load_model(toy_models["decoder"])

    with pytest.raises(ValueError, match="config has no 'n_inner' attribute"):
        prune_ffn_(wrapper, 0.5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda norms: norms.pop("bert.encoder.layer.1"), r"Missing: \['bert.encoder.layer.1'\]"),
        (lambda norms: norms.update(extra=torch.ones(TOY_WIDTH)), r"Unknown: \['extra'\]"),
        (lambda norms: norms.update({"bert.encoder.layer.1": torch.ones(TOY_WIDTH - 1)}), r"shape \(256,\), got \(255,\)"),
        (lambda norms: norms.update({"bert.encoder.layer.1": [1.0] * TOY_WIDTH}), r"shape \(256,\), got list"),
        (lambda norms: norms["bert.encoder.layer.1"].__setitem__(3, -1.0), "finite and non-negative"),
        (lambda norms: norms["bert.encoder.layer.1"].__setitem__(3, math.nan), "finite and non-negative"),
    ],
)
def test_prune_bad_activation_norms_raise(toy_models, edit, message):
    model = load_model(toy_models["encoder"])
    norms = {block.name: torch.ones(TOY_WIDTH) for block in ffn_blocks(model)}
    edit(norms)

    with pytest.raises(ValueError, match=message):
        prune_ffn_(model, 0.5, activation_norms=norms)
    # Checks run before any change, so the first layer is not pruned either.
    assert all(block.width == TOY_WIDTH for block in ffn_blocks(model))
    assert model.config.intermediate_size == TOY_WIDTH


def test_minilm_half_width_reloads(minilm_folder, tmp_path):
    model = load_model(minilm_folder)
    assert type(model).__name__ == "BertModel"
    assert model.config.intermediate_size == 1536
    parameters_before = sum(parameter.numel() for parameter in model.parameters())

    report = prune_ffn_(model, 0.5)

    hidden, layers, removed_width = 384, 6, 768
    expected_removed = layers * removed_width * (2 * hidden + 1)
    assert model.config.intermediate_size == 768
    assert report["parameters_before"] == parameters_before
    assert report["parameters_after"] == parameters_before - expected_removed
    assert report["stacks"]["intermediate_size"]["layers"] == [f"encoder.layer.{i}" for i in range(layers)]

    reloaded, info = reload_with_stock_transformers(model, tmp_path / "minilm-ffn50")
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert reloaded.config.intermediate_size == 768
    input_ids = sample_input_ids(model)
    torch.testing.assert_close(model_output(reloaded, input_ids), model_output(model, input_ids), rtol=0, atol=0)
