# Config validation, wildcard constraints and input functions shared by every rule.

import os
import re
from pathlib import Path

import lmprune.config
from lmprune.config import sparsity_from_label, sparsity_label
from lmprune.methods import method_sparsities, method_spec
from snakemake.exceptions import WorkflowError

try:
    lmprune.config.validate_config(
        config, lmprune.config.load_schema(Path(workflow.basedir) / "config" / "schema.yaml")
    )
except lmprune.config.ConfigError as error:
    raise WorkflowError(f"Invalid config: {error}") from None


MODELS = {model["name"]: model for model in config["models"]}
METHODS = config["methods"]
TASKS = config["tasks"]
FIDELITY = config["fidelity"]["enabled"]
LATENCY = config["latency"]["enabled"]

# Every (model, method, sparsity label) the run prunes: the dense model once, under the first
# method, and N:M methods only at the sparsity their pattern sets.
RUNS = [
    (model, method, sparsity_label(sparsity))
    for model in MODELS
    for method, sparsity in method_sparsities(METHODS, config["sparsities"])
]
CALIBRATED = any(method_spec(method).calibrated for method in METHODS)

# The data sets the run reads: calibration and fidelity read the CLM text.
DATA_TASKS = sorted(set(TASKS) | ({"clm"} if CALIBRATED or FIDELITY else set()))

# Local copies of the benchmark data instead of the hub: LMPRUNE_DATA_DIR wins over the config.
DATA_DIR = os.environ.get("LMPRUNE_DATA_DIR") or config["data"]["local_dir"] or None
if DATA_DIR and DATA_TASKS:
    DATA_DIR = str(Path(DATA_DIR).expanduser().resolve())
    try:
        lmprune.config.check_data_dir(DATA_DIR, DATA_TASKS)
    except lmprune.config.ConfigError as error:
        raise WorkflowError(f"Invalid data folder: {error}") from None

# Benchmark figures: file name -> the task, the bench.csv column plotted and the axis label.
BENCH_FIGURES = {
    "clm_eval_loss": {"task": "clm", "column": "eval_loss", "label": "eval loss (mean token cross-entropy, nats)"},
    "clm_perplexity": {"task": "clm", "column": "perplexity", "label": "perplexity (exp of eval loss)"},
    "clm_train_runtime": {"task": "clm", "column": "train_runtime_s", "label": "training run time (s)"},
    "qnli_accuracy": {"task": "qnli", "column": "accuracy", "label": "QNLI accuracy"},
    "qnli_train_runtime": {"task": "qnli", "column": "train_runtime_s", "label": "training run time (s)"},
}

# Zero-shot fidelity and latency figures: file name -> the table column plotted and the axis label.
FIDELITY_FIGURES = {
    "fidelity_relative_error": {"column": "relative_error", "label": "relative error of final hidden states"},
    "fidelity_cosine": {"column": "cosine", "label": "cosine of mean-pooled embeddings"},
}
LATENCY_FIGURES = {
    "latency_speedup": {"column": "speedup", "label": "speed-up over the dense model (x)"},
    "latency_ms": {"column": "latency_ms", "label": "median latency per batch (ms)"},
}


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    method="|".join(map(re.escape, METHODS)),
    # s0, s5, s50, s87.5: digits only, so a label never runs into the suffix of a figure name.
    sparsity=r"s\d+(\.\d+)?",
    task="clm|qnli",
    figure="|".join(BENCH_FIGURES),


def model_entry(wildcards):
    return MODELS[wildcards.model]


def checkpoint_folder(model, method, sparsity):
    return f"results/checkpoints/{model}/{method}/{sparsity}"


def checkpoint_output():
    """The prune rule's output: temporary when keep_checkpoints is false."""
    folder = directory(checkpoint_folder("{model}", "{method}", "{sparsity}"))
    return folder if config["keep_checkpoints"] else temp(folder)


def checkpoint_input(wildcards):
    return checkpoint_folder(wildcards.model, wildcards.method, wildcards.sparsity)


def expand_runs(pattern, **fixed):
    """Expand a path pattern over RUNS; ``fixed`` fills other wildcards (such as task)."""
    return [pattern.format(model=model, method=method, sparsity=sparsity, **fixed) for model, method, sparsity in RUNS]


def all_local_cores(wildcards):
    """All cores of a local run, so that no other job runs beside a timing; 2 under a cluster executor, which sets no total."""
    try:
        return workflow.cores
    except WorkflowError:
        return 2


def method_reads(wildcards, setting):
    """Whether the method of ``wildcards`` reads ``seed``, ``calibration`` or ``sparsegpt`` settings."""
    spec = method_spec(wildcards.method)
    if setting == "seed":
        return spec.calibrated or spec.base == "random"
    if setting == "calibration":
        return spec.calibrated
    return spec.base == "sparsegpt"


def calibration_input(wildcards):
    """The prune rule's data input: the CLM data record for methods that calibrate."""
    if method_spec(wildcards.method).calibrated:
        return {"data": "results/data/clm.json"}
    return {}


def all_targets():
    targets = [
        "results/tables/sizes.csv",
        "results/figures/size_vs_sparsity.png",
    ]
    targets += expand_runs("results/sizes/{model}/{method}/{sparsity}.json")
    targets += expand_runs("results/histograms/{model}/{method}/{sparsity}-all.png")
    targets += expand_runs("results/histograms/{model}/{method}/{sparsity}-layers.png")
    if TASKS:
        targets.append("results/tables/bench.csv")
        targets += [
            f"results/figures/{name}.png" for name, figure in BENCH_FIGURES.items() if figure["task"] in TASKS
        ]
    if FIDELITY:
        targets += ["results/tables/fidelity.csv"] + [f"results/figures/{name}.png" for name in FIDELITY_FIGURES]
    if LATENCY:
        targets += ["results/tables/latency.csv"] + [f"results/figures/{name}.png" for name in LATENCY_FIGURES]
    if config["keep_checkpoints"]:
        targets += expand_runs(checkpoint_folder("{model}", "{method}", "{sparsity}"))
    return targets
