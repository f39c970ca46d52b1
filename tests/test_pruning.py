"""Tests for lmprune.pruning on small random GPT-2, BART and BERT models and hand-made tensors."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from lmprune.pruning import (
    PRUNING_METHODS,
    GlobalThreshold,
    apply_global_threshold_,
    find_global_threshold,
    measure_sparsity,
    prunable_weights,
    prune_model,
)


def make_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def make_bart():
    torch.manual_seed(1)
    config = BartConfig(
        vocab_size=1000,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
    )
    return BartForConditionalGeneration(config).eval()


def make_bert():
    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    return BertForMaskedLM(config).eval()


MODEL_FACTORIES = {"gpt2": make_gpt2, "bart": make_bart, "bert": make_bert}

# (model family, tied parameter name, name it is tied to and listed under)
TIED_WEIGHTS = [
    ("gpt2", "lm_head.weight", "transformer.wte.weight"),
    ("bart", "lm_head.weight", "model.shared.weight"),
    ("bart", "model.encoder.embed_tokens.weight", "model.shared.weight"),
    ("bart", "model.decoder.embed_tokens.weight", "model.shared.weight"),
    ("bert", "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
]

EMBEDDING_NAMES = {
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],
    "bart": ["model.shared.weight", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"],
    "bert": [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    ],
}


def torch_global_mask(weights, sparsity):
    """Return torch's global L1 unstructured masks for copies of ``weights``."""
    holders = []
    for weight in weights:
        holder = nn.Module()
        holder.weight = nn.Parameter(weight.detach().clone())
        holders.append(holder)
    prune.global_unstructured(
        [(holder, "weight") for holder in holders], pruning_method=prune.L1Unstructured, amount=sparsity
    )
    return [holder.weight_mask.bool() for holder in holders]


def non_prunable_state(model, include_embeddings=True):
    prunable_ids = {id(param) for _, param in prunable_weights(model, include_embeddings)}
    return {name: param.detach().clone() for name, param in model.named_parameters() if id(param) not in prunable_ids}


def count_zeros(tensors):
    return sum(int((tensor == 0).sum()) for tensor in tensors)


# prunable_weights


def test_pruning_methods_start_with_the_study_baseline():
    assert PRUNING_METHODS[0] == "magnitude"
    assert {"random", "magnitude-layer", "wanda", "sparsegpt", "wanda-2of4", "structured-ffn"} <= set(PRUNING_METHODS)


def test_prunable_weights_gpt2_includes_conv1d():
    names = [name for name, _ in prunable_weights(make_gpt2())]

    for layer in range(2):
        assert f"transformer.h.{layer}.attn.c_attn.weight" in names
        assert f"transformer.h.{layer}.attn.c_proj.weight" in names
        assert f"transformer.h.{layer}.mlp.c_fc.weight" in names
        assert f"transformer.h.{layer}.mlp.c_proj.weight" in names
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert len(names) == 2 + 4 * 2


@pytest.mark.parametrize("family", MODEL_FACTORIES)
def test_prunable_weights_excludes_bias_and_layernorm(family):
    model = MODEL_FACTORIES[family]()
    layer_norm_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}

    for name, param in prunable_weights(model):
        assert name.endswith(".weight"), name
        assert param.dim() == 2, name
        assert id(param) not in layer_norm_ids, name


@pytest.mark.parametrize("family,tied_name,listed_name", TIED_WEIGHTS)
def test_prunable_weights_lists_tied_once(family, tied_name, listed_name):
    model = MODEL_FACTORIES[family]()
    named = prunable_weights(model)
    names = [name for name, _ in named]
    params = [param for _, param in named]
    tied = model.get_parameter(tied_name)

    assert tied is model.get_parameter(listed_name)
    assert tied_name not in names
    assert names.count(listed_name) == 1
    assert sum(param is tied for param in params) == 1
    assert len({id(param) for param in params}) == len(params)


@pytest.mark.parametrize("family", MODEL_FACTORIES)
def test_prunable_weights_without_embeddings(family):
    model = MODEL_FACTORIES[family]()
    with_embeddings = [name for name, _ in prunable_weights(model)]
    without = [name for name, _ in prunable_weights(model, include_embeddings=False)]

    for name in EMBEDDING_NAMES[family]:
        assert name in with_embeddings
        assert name not in without
    assert without == [name for name in with_embeddings if name not in EMBEDDING_NAMES[family]]


def test_prunable_weights_order_is_stable():
    first = [name for name, _ in prunable_weights(make_bart())]
    second = [name for name, _ in prunable_weights(make_bart())]
    assert first == second


# Agreement with torch.nn.utils.prune


@pytest.mark.parametrize("family", MODEL_FACTORIES)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_mask_matches_torch_global_unstructured(family, sparsity):
    model = MODEL_FACTORIES[family]()
    weights = [param for _, param in prunable_weights(model)]
    expected_masks = torch_global_mask(weights, sparsity)

    prune_model(model, "magnitude", sparsity)

    for (name, param), expected in zip(prunable_weights(model), expected_masks):
        kept_mask = param.detach() != 0
        assert torch.equal(kept_mask, expected), f"{name}: {int((kept_mask != expected).sum())} positions differ"


@pytest.mark.parametrize("chunk_numel", [1, 7, 1000, 2**24])
def test_chunk_size_does_not_change_mask(chunk_numel):
    torch.manual_seed(3)
    weights = [torch.randn(40, 30), torch.randn(100), torch.randn(3, 5, 7)]
    expected_masks = torch_global_mask(weights, 0.4)

    threshold = find_global_threshold(weights, 0.4, chunk_numel=chunk_numel)
    apply_global_threshold_(weights, threshold, chunk_numel=chunk_numel)

    for weight, expected in zip(weights, expected_masks):
        assert torch.equal(weight != 0, expected)


# prune_model


@pytest.mark.parametrize("family", MODEL_FACTORIES)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_prune_model_exact_zero_count(family, sparsity):
    model = MODEL_FACTORIES[family]()
    num_weights = sum(param.numel() for _, param in prunable_weights(model))

    report = prune_model(model, "magnitude", sparsity)

    zeros = count_zeros(param for _, param in prunable_weights(model))
    assert zeros == round(sparsity * num_weights)
    assert report.num_weights == num_weights
    assert report.num_pruned == round(sparsity * num_weights)
    assert report.sparsity_achieved == zeros / num_weights
    assert report.sparsity_target == sparsity
    assert report.method == "magnitude"


@pytest.mark.parametrize("family", MODEL_FACTORIES)
def test_prune_model_report_per_tensor(family):
    model = MODEL_FACTORIES[family]()

    report = prune_model(model, "magnitude", 0.5)

    named = prunable_weights(model)
    assert [entry["name"] for entry in report.tensors] == [name for name, _ in named]
    for entry, (name, param) in zip(report.tensors, named):
        zeros = int((param == 0).sum())
        assert entry["shape"] == list(param.shape), name
        assert entry["numel"] == param.numel(), name
        assert entry["zeros"] == zeros, name
        assert entry["sparsity"] == zeros / param.numel(), name
        kept_magnitudes = param.detach()[param.detach() != 0].abs()
        assert kept_magnitudes.min().item() >= report.threshold, name


def test_prune_model_report_is_json_ready():
    report = prune_model(make_gpt2(), "magnitude", 0.3)

    decoded = json.loads(json.dumps(report.to_dict()))

    assert decoded["method"] == "magnitude"
    assert decoded["num_pruned"] == report.num_pruned
    assert decoded["tensors"][0]["name"] == "transformer.wte.weight"
    assert set(decoded) == {
        "method",
        "sparsity_target",
        "threshold",
        "num_weights",
        "num_pruned",
        "sparsity_achieved",
        "scope",
        "model_sparsity",
        "tensors",
        "details",
    }
    assert decoded["scope"] == "prunable"
    assert decoded["model_sparsity"] == decoded["sparsity_achieved"]


def test_prune_model_prunes_gpt2_conv1d():
    model = make_gpt2()

    prune_model(model, "magnitude", 0.5)

    for layer in model.transformer.h:
        for module in (layer.attn.c_attn, layer.attn.c_proj, layer.mlp.c_fc, layer.mlp.c_proj):
            zeros = int((module.weight == 0).sum())
            assert 0 < zeros < module.weight.numel()


@pytest.mark.parametrize("family", MODEL_FACTORIES)
def test_prune_model_leaves_other_params(family):
    model = MODEL_FACTORIES[family]()
    before = non_prunable_state(model)
    layer_norm_weights = {name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)}
    assert any(name.endswith(".bias") for name in before)
    assert any(name.removesuffix(".weight") in layer_norm_weights for name in before)

    prune_model(model, "magnitude", 0.9)

    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("family", MODEL_FACTORIES)
def test_prune_model_without_embeddings(family):
    model = MODEL_FACTORIES[family]()
    embeddings_before = {name: model.get_parameter(name).detach().clone() for name in EMBEDDING_NAMES[family]}
    num_weights = sum(param.numel() for _, param in prunable_weights(model, include_embeddings=False))

    report = prune_model(model, "magnitude", 0.5, include_embeddings=False)

    for name, value in embeddings_before.items():
        assert torch.equal(model.get_parameter(name), value), name
    assert report.num_weights == num_weights
    assert count_zeros(param for _, param in prunable_weights(model, include_embeddings=False)) == round(
        0.5 * num_weights
    )


@pytest.mark.parametrize("family,tied_name,listed_name", TIED_WEIGHTS)
def test_prune_model_keeps_tied_weights(family, tied_name, listed_name):
    model = MODEL_FACTORIES[family]()

    prune_model(model, "magnitude", 0.5)

    assert model.get_parameter(tied_name) is model.get_parameter(listed_name)
    assert int((model.get_parameter(tied_name) == 0).sum()) > 0


def test_prune_model_zero_sparsity_changes_nothing():
    model = make_gpt2()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}

    report = prune_model(model, "magnitude", 0.0)

    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert report.num_pruned == 0
    assert report.sparsity_achieved == 0.0


def test_prune_model_keeps_forward_working():
    model = make_gpt2()
    prune_model(model, "magnitude", 0.5)

    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits

    assert logits.shape == (1, 4, 1000)
    assert torch.isfinite(logits).all()


def test_prune_model_rejects_unknown_method():
    with pytest.raises(ValueError, match=r"'obd'.*magnitude"):
        prune_model(make_gpt2(), "obd", 0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, math.nan, True, "0.5"])
def test_prune_model_rejects_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(make_gpt2(), "magnitude", sparsity)


def test_prune_model_rejects_nan_naming_tensor():
    model = make_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = math.nan

    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*NaN"):
        prune_model(model, "magnitude", 0.5)


# Ties and the exact count


def test_ties_pruned_in_tensor_then_index_order():
    weights = [
        torch.tensor([1.0, 2.0, -2.0, 2.0, 0.5]),
        torch.tensor([[2.0, -2.0], [3.0, 2.0]]),
    ]
    # 9 weights, round(0.6 * 9) = 5: the two below 2.0, then the first three of the six ties.
    threshold = find_global_threshold(weights, 0.6)

    assert threshold == GlobalThreshold(
        threshold=2.0, num_weights=9, num_to_prune=5, num_below=2, num_ties_to_prune=3
    )
    pruned = apply_global_threshold_(weights, threshold)
    assert pruned == [5, 0]
    assert weights[0].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert weights[1].tolist() == [[2.0, -2.0], [3.0, 2.0]]


@pytest.mark.parametrize("chunk_numel", [1, 3, 2**24])
def test_ties_cross_tensor_and_chunk(chunk_numel):
    weights = [torch.ones(5), torch.full((2, 3), -1.0), torch.ones(4)]
    # 15 equal magnitudes, round(0.6 * 15) = 9: all of tensor 0 and the first 4 of tensor 1.
    threshold = find_global_threshold(weights, 0.6, chunk_numel=chunk_numel)
    pruned = apply_global_threshold_(weights, threshold, chunk_numel=chunk_numel)

    assert threshold.num_below == 0
    assert threshold.num_ties_to_prune == 9
    assert pruned == [5, 4, 0]
    assert weights[0].tolist() == [0.0] * 5
    assert weights[1].tolist() == [[0.0, 0.0, 0.0], [0.0, -1.0, -1.0]]
    assert weights[2].tolist() == [1.0] * 4


def test_ties_with_signed_zeros_and_inf():
    weights = [torch.tensor([-0.0, 0.0, math.inf, -math.inf, 1.0, -0.0])]

    threshold = find_global_threshold(weights, 0.5)
    apply_global_threshold_(weights, threshold)

    assert threshold.threshold == 0.0
    assert threshold.num_ties_to_prune == 3
    assert weights[0][2:].tolist() == [math.inf, -math.inf, 1.0, 0.0]


def test_sparsity_uses_python_round():
    weights = [torch.arange(1.0, 6.0)]

    # round(2.5) == 2 (round half to even), as in torch.nn.utils.prune.
    threshold = find_global_threshold(weights, 0.5)

    assert threshold.num_to_prune == 2
    assert threshold.threshold == 2.0


def test_highest_sparsity_prunes_all_but_largest():
    weights = [torch.tensor([4.0, -1.0, 3.0]), torch.tensor([2.0, 5.0])]

    threshold = find_global_threshold(weights, 0.8)
    apply_global_threshold_(weights, threshold)

    assert weights[0].tolist() == [0.0, 0.0, 0.0]
    assert weights[1].tolist() == [0.0, 5.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_numel", [7, 2**24])
def test_half_precision_exact_count(dtype, chunk_numel):
    torch.manual_seed(4)
    weights = [torch.randn(300, 20).to(dtype), torch.randn(500).to(dtype)]
    original = [weight.clone() for weight in weights]
    num_to_prune = round(0.35 * 6500)

    threshold = find_global_threshold(weights, 0.35, chunk_numel=chunk_numel)
    pruned = apply_global_threshold_(weights, threshold, chunk_numel=chunk_numel)

    assert sum(pruned) == num_to_prune
    assert count_zeros(weights) == num_to_prune
    for weight, before in zip(weights, original):
        assert weight.dtype == dtype
        pruned_magnitudes = before[weight == 0].float().abs()
        kept_magnitudes = before[weight != 0].float().abs()
        assert pruned_magnitudes.max().item() <= threshold.threshold
        assert kept_magnitudes.min().item() >= threshold.threshold


def test_half_precision_masks_match_torch_outside_ties():
    torch.manual_seed(5)
    weights = [torch.randn(200, 30).half(), torch.randn(700).half()]
    original = [weight.clone() for weight in weights]
    expected_masks = torch_global_mask(weights, 0.5)

    threshold = find_global_threshold(weights, 0.5)
    apply_global_threshold_(weights, threshold)

    assert count_zeros(weights) == count_zeros(~mask for mask in expected_masks)
    for weight, before, expected in zip(weights, original, expected_masks):
        differs = (weight != 0) != expected
        # fp16 has many equal values, so torch may split the boundary value differently.
        assert not differs[before.float().abs() != threshold.threshold].any()


# Inputs and guards


def test_non_contiguous_weight_pruned_in_place():
    torch.manual_seed(6)
    base = torch.randn(30, 20)
    transposed = base.t()
    expected = torch_global_mask([transposed.contiguous()], 0.5)[0]

    threshold = find_global_threshold([transposed], 0.5)
    apply_global_threshold_([transposed], threshold)

    assert torch.equal(transposed != 0, expected)
    assert int((base == 0).sum()) == 300


def test_empty_weight_list():
    threshold = find_global_threshold([], 0.5)

    assert threshold.num_weights == 0
    assert threshold.num_to_prune == 0
    assert apply_global_threshold_([], threshold) == []


def test_find_rejects_float64():
    with pytest.raises(TypeError, match=r"weights\[1\].*float64"):
        find_global_threshold([torch.ones(3), torch.ones(3, dtype=torch.float64)], 0.5)


def test_find_rejects_nan_by_index():
    with pytest.raises(ValueError, match=r"weights\[1\].*NaN"):
        find_global_threshold([torch.ones(3), torch.tensor([1.0, math.nan])], 0.5)


def test_find_rejects_bad_chunk_numel():
    with pytest.raises(ValueError, match="chunk_numel"):
        find_global_threshold([torch.ones(3)], 0.5, chunk_numel=0)


def test_find_rejects_wrong_number_of_names():
    with pytest.raises(ValueError, match="2 names for 1"):
        find_global_threshold([torch.ones(3)], 0.5, names=["a", "b"])


def test_find_modifies_nothing():
    torch.manual_seed(7)
    weights = [torch.randn(50, 4).half(), torch.randn(80)]
    before = [weight.clone() for weight in weights]

    find_global_threshold(weights, 0.7, chunk_numel=16)

    for weight, original in zip(weights, before):
        assert torch.equal(weight, original)


def test_apply_rejects_other_weights():
    threshold = find_global_threshold([torch.randn(10)], 0.5)

    with pytest.raises(ValueError, match="11 elements.*10"):
        apply_global_threshold_([torch.randn(11)], threshold)


def test_apply_rejects_changed_weights():
    weights = [torch.arange(1.0, 11.0)]
    threshold = find_global_threshold(weights, 0.5)
    weights[0].fill_(100.0)

    with pytest.raises(ValueError, match="changed"):
        apply_global_threshold_(weights, threshold)


def test_measure_sparsity_counts():
    tensors = [("a", torch.tensor([[0.0, 1.0], [0.0, -0.0]])), ("b", torch.ones(3)), ("c", torch.empty(0))]

    zeros, numel, entries = measure_sparsity(tensors)

    assert (zeros, numel) == (3, 7)
    assert entries[0] == {"name": "a", "shape": [2, 2], "numel": 4, "zeros": 3, "sparsity": 0.75}
    assert entries[1]["zeros"] == 0
    assert entries[2]["sparsity"] == 0.0


# Save and load


@pytest.mark.parametrize("family", MODEL_FACTORIES)
def test_save_load_round_trip(tmp_path, family):
    model = MODEL_FACTORIES[family]()
    prune_model(model, "magnitude", 0.6)
    expected = {name: param.detach().clone() for name, param in prunable_weights(model)}

    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)

    assert (tmp_path / "model.safetensors").exists()
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    for case_family, tied_name, listed_name in TIED_WEIGHTS:
        if case_family == family:
            assert loaded.get_parameter(tied_name) is loaded.get_parameter(listed_name), tied_name
    for name, value in expected.items():
        assert torch.equal(loaded.get_parameter(name), value), name
    assert count_zeros(expected.values()) == count_zeros(param for _, param in prunable_weights(loaded))
