"""Tests for the method names, the per-matrix methods and layer-by-layer calibration."""

import pytest
import torch
import yaml
from transformers.pytorch_utils import Conv1D

from conftest import DATA, REPO
from lmprune import calibration, masks
from lmprune.calibration import CalibrationSettings, calibration_windows, layer_linears, layer_stacks
from lmprune.data import DataError, read_text_file
from lmprune.methods import METHOD_NAMES, method_sparsities, method_spec
from lmprune.pruning import prunable_weights, prune_model
from test_pruning import make_bart, make_bert, make_gpt2

MAKERS = {"gpt2": make_gpt2, "bart": make_bart, "bert": make_bert}


def windows_for(model, samples=6, seq_length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (samples, seq_length), generator=generator)


def out_in(module):
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


# Method names


def test_schema_lists_every_method():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    assert tuple(schema["properties"]["methods"]["items"]["enum"]) == METHOD_NAMES


def test_method_spec_parses_n_m_suffix():
    spec = method_spec("sparsegpt-2of4")
    assert (spec.base, spec.kept, spec.group, spec.fixed_sparsity) == ("sparsegpt", 2, 4, 0.5)
    assert spec.calibrated
    assert spec.layerwise
    assert not spec.structured
    assert method_spec("magnitude-4of8").calibrated is False
    assert method_spec("magnitude").layerwise is False
    assert method_spec("structured-ffn").structured


def test_method_spec_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"'wanda-1of4'.*sparsegpt-2of4"):
        method_spec("wanda-1of4")


def test_method_sparsities_dense_once():
    pairs = method_sparsities(["magnitude", "wanda", "wanda-2of4"], [0.0, 0.3, 0.7])
    assert pairs == [
        ("magnitude", 0.0), ("magnitude", 0.3), ("magnitude", 0.7),
        ("wanda", 0.3), ("wanda", 0.7),
        ("wanda-2of4", 0.5),
    ]
    assert method_sparsities(["random"], [0.5]) == [("random", 0.5)]


# Per-matrix methods


@pytest.mark.parametrize("maker", MAKERS.values(), ids=MAKERS.keys())
def test_magnitude_layer_per_matrix(maker):
    model = maker()
    dense = {name: weight.detach().clone() for name, weight in prunable_weights(model)}
    report = prune_model(model, "magnitude-layer", 0.4)

    for name, weight in prunable_weights(model):
        expected = masks.lowest_mask(dense[name].abs().float(), 0.4)
        assert torch.equal(weight == 0, expected), name
    assert report.sparsity_achieved == pytest.approx(0.4, abs=1e-3)
    assert report.threshold is None
    assert report.model_sparsity == pytest.approx(report.sparsity_achieved)


def test_random_is_reproducible_and_exact_per_matrix():
    first, second, third = make_bert(), make_bert(), make_bert()
    dense_zeros = [int((weight == 0).sum()) for _, weight in prunable_weights(first)]
    prune_model(first, "random", 0.5, seed=3)
    prune_model(second, "random", 0.5, seed=3)
    prune_model(third, "random", 0.5, seed=4)

    for (name, a), (_, b), zeros in zip(prunable_weights(first), prunable_weights(second), dense_zeros):
        assert torch.equal(a == 0, b == 0), name
        # round(0.5 * n) are drawn; weights that were zero before (padding rows) may be among them.
        assert round(0.5 * a.numel()) <= int((a == 0).sum()) <= round(0.5 * a.numel()) + zeros
    assert any(not torch.equal(a == 0, c == 0) for (_, a), (_, c) in zip(prunable_weights(first), prunable_weights(third)))


def test_sparsity_zero_changes_nothing_for_any_method():
    model = make_gpt2()
    dense = [weight.detach().clone() for _, weight in prunable_weights(model)]
    report = prune_model(model, "sparsegpt", 0.0)
    assert all(torch.equal(a, b) for a, (_, b) in zip(dense, prunable_weights(model)))
    assert report.num_pruned == 0


def test_n_m_method_rejects_other_sparsities():
    with pytest.raises(ValueError, match=r"wanda-2of4 keeps 2 of every 4.*s50"):
        prune_model(make_bert(), "wanda-2of4", 0.7)


# Layer-by-layer methods


def test_layer_stacks_in_forward_order():
    assert [name for name, _ in layer_stacks(make_bert())] == ["bert.encoder.layer"]
    assert [name for name, _ in layer_stacks(make_gpt2())] == ["transformer.h"]
    assert [name for name, _ in layer_stacks(make_bart())] == ["model.encoder.layers", "model.decoder.layers"]


@pytest.mark.parametrize("method", ["magnitude-2of4", "wanda-4of8", "sparsegpt-2of4"])
@pytest.mark.parametrize("maker", MAKERS.values(), ids=MAKERS.keys())
def test_n_m_pattern_holds_in_every_layer_weight(maker, method):
    model = maker()
    spec = method_spec(method)
    embeddings = {name: weight.detach().clone() for name, weight in prunable_weights(model) if "embed" in name or "wte" in name or "wpe" in name}
    report = prune_model(model, method, 0.5, windows=windows_for(model), settings=CalibrationSettings(batch_size=4))

    for _, stack in layer_stacks(model):
        for layer in stack:
            for name, module in layer_linears(layer):
                groups = out_in(module).reshape(out_in(module).shape[0], -1, spec.group)
                assert ((groups != 0).sum(dim=-1) <= spec.kept).all(), name
    assert report.scope == "layers"
    assert report.sparsity_achieved == pytest.approx(0.5, abs=1e-6)
    for name, weight in prunable_weights(model):
        if name in embeddings:
            assert torch.equal(weight, embeddings[name]), f"{name} must stay dense"


@pytest.mark.parametrize("maker", MAKERS.values(), ids=MAKERS.keys())
def test_wanda_uses_inputs_of_the_already_pruned_layers(maker):
    """Each layer's first projections are scored on the inputs the pruned model gives them.

    The query/key/value (GPT-2: c_attn) projections read the layer's input, which comes from
    the layers below after they were pruned. Running the pruned model again and scoring the
    dense weights with the input norms seen there must give the mask Wanda chose.
    """
    model = maker()
    windows = windows_for(model)
    dense = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    prune_model(model, "wanda", 0.5, windows=windows, settings=CalibrationSettings(batch_size=4))

    first_projections = {}
    for stack_name, stack in layer_stacks(model):
        for index, layer in enumerate(stack):
            for name, module in layer_linears(layer):
                if name.endswith(("q_proj", "query", "c_attn")) and "encoder_attn" not in name and "crossattention" not in name:
                    first_projections[f"{stack_name}.{index}.{name}"] = module
    statistics = {name: masks.InputStatistics(out_in(module).shape[1], hessian=False) for name, module in first_projections.items()}
    handles = [
        module.register_forward_hook(lambda m, inputs, output, s=statistics[name]: s.update(inputs[0]))
        for name, module in first_projections.items()
    ]
    with torch.no_grad():
        for batch in windows.split(4):
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    for handle in handles:
        handle.remove()

    assert len(first_projections) >= 2
    for name, module in first_projections.items():
        weight = dense[f"{name}.weight"]
        weight = weight.t() if isinstance(module, Conv1D) else weight
        expected = masks.row_lowest_mask(masks.wanda_scores(weight, statistics[name].norms()), 0.5)
        assert torch.equal(out_in(module) == 0, expected), name


def test_sparsegpt_beats_magnitude_reconstruction():
    torch.manual_seed(0)
    dense = make_bert()
    windows = windows_for(dense, samples=16)
    settings = CalibrationSettings(batch_size=8, block_size=32)

    def output_error(method):
        model = make_bert()
        prune_model(model, method, 0.5, windows=windows, settings=settings)
        with torch.no_grad():
            pruned = model(input_ids=windows).logits
            reference = dense(input_ids=windows).logits
        return float((pruned - reference).norm() / reference.norm())

    assert output_error("sparsegpt") < output_error("magnitude-layer")


def test_calibrated_method_without_windows_fails():
    with pytest.raises(ValueError, match="calibration windows"):
        prune_model(make_bert(), "wanda", 0.5)


# Calibration windows on the real text and tokenizer


def test_calibration_windows_wrap_text_in_special_tokens(minilm_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    texts = read_text_file(DATA / "wikitext-2" / "valid.txt").texts
    windows = calibration_windows(tokenizer, texts, samples=8, seq_length=32, seed=0, max_positions=512)

    assert windows.shape == (8, 32)
    assert (windows[:, 0] == tokenizer.cls_token_id).all()
    assert (windows[:, -1] == tokenizer.sep_token_id).all()
    assert torch.equal(windows, calibration_windows(tokenizer, texts, 8, 32, seed=0))
    assert not torch.equal(windows, calibration_windows(tokenizer, texts, 8, 32, seed=1))


def test_calibration_windows_short_text(minilm_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    with pytest.raises(DataError, match=r"pruning.calibration.samples=50.*gives only"):
        calibration_windows(tokenizer, ["a short line of text"] * 20, samples=50, seq_length=16, seed=0)
    with pytest.raises(DataError, match=r"seq_length=1024 exceeds the model's 512"):
        calibration_windows(tokenizer, ["text"], samples=1, seq_length=1024, seed=0, max_positions=512)


@pytest.mark.parametrize("maker", MAKERS.values(), ids=MAKERS.keys())
def test_structured_ffn_report(maker):
    model = maker()
    parameters_before = sum(parameter.numel() for parameter in model.parameters())
    report = prune_model(model, "structured-ffn", 0.5, windows=windows_for(model), settings=CalibrationSettings(batch_size=4))

    assert report.scope == "ffn"
    assert report.sparsity_achieved == pytest.approx(0.5)
    assert report.details["structured"]["importance"] == "activation_norms"
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters_before - report.num_pruned - sum(
        width["width_before"] - width["width_after"] for width in report.details["structured"]["stacks"].values()
        for _ in width["layers"]
    )


def test_figures_start_every_method_from_the_dense_point():
    import pandas as pd

    from lmprune.plots import with_dense_reference

    table = pd.DataFrame({
        "model": ["m", "m", "m", "m"],
        "method": ["magnitude", "magnitude", "wanda", "wanda-2of4"],
        "sparsity": [0.0, 0.5, 0.5, 0.5],
        "accuracy": [0.8, 0.6, 0.7, 0.65],
    })

    completed = with_dense_reference(table)

    dense = completed[completed["sparsity"] == 0].set_index("method")["accuracy"]
    assert dense.to_dict() == {"magnitude": 0.8, "wanda": 0.8, "wanda-2of4": 0.8}
    assert len(table) == 4
