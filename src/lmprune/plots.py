"""Checkpoint size against sparsity: the long table and its figure.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas and never go through
``pyplot``, so no display is needed, no global figure state is kept between calls and the
caller's matplotlib backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lmprune.io import atomic_output_path
from lmprune.sizes import CODECS

RAW = "raw"
TABLE_COLUMNS = ("model", "method", "sparsity", "codec", "level", "bytes", "ratio")
_REQUIRED_COLUMNS = ("model", "method", "sparsity", "codec", "bytes")
_RECORD_KEYS = ("model", "method", "sparsity", "weights_bytes", "codecs")

# Fixed colour per codec, so the same codec has the same colour in every figure.
_CODEC_COLORS = {RAW: "black"} | {codec: f"C{i}" for i, codec in enumerate(CODECS)}
_METHOD_LINESTYLES = ("-", "--", ":", "-.")
# Markers cycle with a length prime to the line styles', so up to 36 methods look different.
_METHOD_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P")
_BYTES_PER_MB = 1e6


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Render ``figure`` with the Agg canvas and write it to ``path`` atomically.

    The file format comes from the suffix of ``path`` (``.png``, ``.pdf``, ``.svg``, ...)
    and is PNG when there is none.
    """
    FigureCanvasAgg(figure)
    image_format = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_output_path(path) as temp_path:
        figure.savefig(temp_path, format=image_format, dpi=dpi)


def size_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Turn :func:`lmprune.sizes.measure_checkpoint` records into one row per codec.

    Each record is a ``measure_checkpoint`` dict with the added keys ``model``,
    ``method`` and ``sparsity`` (fraction from 0 to 1). It gives one ``raw`` row, whose
    ``bytes`` is the uncompressed size of the weights files, and one row per entry of
    ``codecs`` with the compressed size of the same files. The result has the columns
    of ``TABLE_COLUMNS``. ``level`` is missing (``<NA>``) for ``raw`` and ``ratio`` is
    uncompressed over compressed bytes (1.0 for ``raw``). Rows are sorted by model,
    method and sparsity, and keep the record's codec order within each checkpoint.

    Raises ``ValueError`` when a record lacks one of the keys, or when its sparsity is
    outside 0..1.
    """
    rows = []
    for index, record in enumerate(records):
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(
                f"size record {index} is missing the keys {missing}. Expected a "
                "measure_checkpoint result with 'model', 'method' and 'sparsity' added"
            )
        sparsity = float(record["sparsity"])
        _check_sparsity(sparsity, f"size record {index}")

        key = {"model": record["model"], "method": record["method"], "sparsity": sparsity}
        weights_bytes = record["weights_bytes"]
        rows.append(key | {"codec": RAW, "level": None, "bytes": weights_bytes, "ratio": 1.0})
        for codec, result in record["codecs"].items():
            rows.append(
                key
                | {
                    "codec": codec,
                    "level": result["level"],
                    "bytes": result["compressed_bytes"],
                    "ratio": result["ratio"],
                }
            )

    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["level"] = table["level"].astype("Int64")
    table["bytes"] = table["bytes"].astype("int64")
    table["ratio"] = table["ratio"].astype("float64")
    return table.sort_values(["model", "method", "sparsity"], kind="stable", ignore_index=True)


def _check_sparsity(sparsity: float, where: str) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(
            f"invalid sparsity {sparsity} in {where}: expected a fraction from 0 to 1, "
            "not a percentage"
        )


def _validate_size_table(table: pd.DataFrame) -> None:
    """Raise ``ValueError`` for a table that ``plot_size_vs_sparsity`` cannot draw."""
    missing = [column for column in _REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"size table is missing the columns {missing}")
    if table.empty:
        raise ValueError("size table is empty, so there is nothing to plot")

    for sparsity in table["sparsity"]:
        _check_sparsity(float(sparsity), "the size table")

    key = ["model", "method", "sparsity", "codec"]
    duplicated = table[table.duplicated(key, keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise ValueError(
            "size table has more than one row for model={model!r}, method={method!r}, "
            "sparsity={sparsity}, codec={codec!r}; expected one row per checkpoint and "
            "codec".format(**first[key].to_dict())
        )


def _codec_order(codecs: Sequence[str]) -> list[str]:
    """Order codec names as raw, then ``CODECS``, then any others alphabetically."""
    known = [RAW, *CODECS]
    return sorted(set(codecs), key=lambda c: (known.index(c) if c in known else len(known), c))


def _line_style(codec: str, method_index: int) -> dict[str, Any]:
    """Return the colour (per codec) and line style (per method) of one line."""
    return {
        "color": _CODEC_COLORS.get(codec, "0.5"),
        "linestyle": _METHOD_LINESTYLES[method_index % len(_METHOD_LINESTYLES)],
        "marker": _METHOD_MARKERS[method_index % len(_METHOD_MARKERS)],
        "markersize": 3,
    }


def _draw_size_panel(ax: Any, rows: pd.DataFrame, methods: list[Any], codecs: list[str]) -> None:
    """Draw size in MB against sparsity in percent, one line per (method, codec) of ``rows``."""
    for method_index, method in enumerate(methods):
        for codec in codecs:
            line = rows[(rows["method"] == method) & (rows["codec"] == codec)]
            if line.empty:
                continue
            line = line.sort_values("sparsity")
            ax.plot(
                100.0 * line["sparsity"],
                line["bytes"] / _BYTES_PER_MB,
                **_line_style(codec, method_index),
            )
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("weights size (MB, 10^6 bytes)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def _add_size_legend(
    figure: Figure, table: pd.DataFrame, methods: list[Any], codecs: list[str]
) -> None:
    """Add one legend below all panels: the codecs' colours, then the methods' line styles.

    A shared legend outside the panels hides no line. Listing codecs and methods apart keeps
    the legend inside the figure's width, where one entry per (codec, method) pair would not.
    """
    present = set(table["codec"])
    handles = [
        Line2D([], [], color=_CODEC_COLORS.get(codec, "0.5"), marker="o", markersize=3)
        for codec in codecs if codec in present
    ]
    labels = [codec for codec in codecs if codec in present]
    if len(methods) > 1:
        handles += [Line2D([], [], **(_line_style(RAW, index) | {"color": "0.4"})) for index in range(len(methods))]
        labels += [f"method: {method}" for method in methods]
    figure.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 3),
        fontsize="small",
        title="codec" if len(methods) == 1 else "colour: codec, line: method",
    )


def plot_size_vs_sparsity(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Plot weights size in MB against sparsity, one panel per model, and save it to ``path``.

    ``table`` has one row per (model, method, sparsity, codec) with at least the columns
    ``model``, ``method``, ``sparsity`` (fraction 0..1), ``codec`` (``"raw"`` for the
    uncompressed size) and ``bytes``, as :func:`size_table` returns. Each panel has one
    line per codec, and each pruning method gets its own line style. The y axis starts at
    0 and is not shared, because model sizes differ widely (MiniLM-L6 to GPT-2 XL). The file is
    written atomically, and the format comes from the suffix of ``path``.

    Raises ``ValueError`` for missing columns, an empty table, a sparsity outside 0..1 or
    a duplicated (model, method, sparsity, codec) row.
    """
    _validate_size_table(table)
    table = with_dense_reference(table)

    models = list(dict.fromkeys(table["model"]))
    methods = list(dict.fromkeys(table["method"]))
    codecs = _codec_order(table["codec"])

    columns = min(len(models), 3)
    rows = math.ceil(len(models) / columns)
    width = max(4.8 * columns, 6.4)
    # Panels, title, and the legend's rows of three entries (codecs, then methods).
    entries = len(codecs) + (len(methods) if len(methods) > 1 else 0)
    height = 3.6 * rows + 0.9 + 0.25 * math.ceil(entries / 3)
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()

    for ax, model in zip(axes, models):
        _draw_size_panel(ax, table[table["model"] == model], methods, codecs)
        ax.set_title(str(model))
    for ax in axes[len(models) :]:
        ax.set_visible(False)

    _add_size_legend(figure, table, methods, codecs)
    figure.suptitle("Size of the .safetensors weights against sparsity: raw and compressed")
    save_figure(figure, path)


# Columns of the benchmark table, in order; a task leaves the other task's metrics empty.
BENCH_COLUMNS = (
    "task", "model", "family", "method", "masks_kept", "untrained", "sparsity",
    "sparsity_before", "sparsity_after", "eval_loss", "perplexity", "accuracy",
    "zero_shot_eval_loss", "zero_shot_perplexity", "train_runtime_s", "train_samples_per_s",
    "eval_runtime_s", "train_samples", "eval_samples", "train_tokens", "eval_tokens",
    "block_size", "device", "world_size", "seed",
)


def bench_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Flatten benchmark JSONs (one per task, model, method and sparsity) into one table.

    Returns a DataFrame with ``BENCH_COLUMNS``, sorted by task, model, method and sparsity.
    CLM rows take ``train_samples`` from the training blocks and ``eval_tokens`` from the
    tokens the perplexity averages over.
    """
    rows = []
    for record in records:
        zero_shot = record.get("zero_shot") or {}
        evaluation = record.get("eval") or {}
        row = {column: record.get(column) for column in BENCH_COLUMNS}
        row["zero_shot_eval_loss"] = zero_shot.get("eval_loss")
        row["zero_shot_perplexity"] = zero_shot.get("perplexity")
        row["eval_tokens"] = evaluation.get("eval_tokens")
        if record.get("task") == "clm":
            row["train_samples"] = record.get("train_blocks")
            row["eval_samples"] = evaluation.get("eval_blocks")
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(BENCH_COLUMNS))
    return table.sort_values(["task", "model", "method", "sparsity"], kind="stable").reset_index(drop=True)


def _series_label(model: str, method: str, masks_kept: bool, untrained: bool) -> str:
    label = f"{model}, {method}"
    if not masks_kept:
        label += " (no masks)"
    if untrained:
        label += " (UNTRAINED)"
    return label


def with_dense_reference(table: pd.DataFrame) -> pd.DataFrame:
    """Copy each model's sparsity-0 rows to every method of that model that lacks them.

    The dense model is pruned once, under the first method of the config (see
    :func:`lmprune.methods.method_sparsities`), but it is the starting point of every method's
    curve. Returns a new table; the input is not modified.
    """
    if table.empty or "sparsity" not in table.columns:
        return table
    copies = []
    for model, rows in table.groupby("model", sort=False):
        dense = rows[rows["sparsity"] == 0]
        if dense.empty:
            continue
        for method in rows["method"].unique():
            if not (rows[(rows["method"] == method)]["sparsity"] == 0).any():
                copies.append(dense.assign(method=method))
    if not copies:
        return table
    return pd.concat([table, *copies], ignore_index=True)


def plot_metric_vs_sparsity(
    table: pd.DataFrame, column: str, label: str, path: str | os.PathLike[str], title: str
) -> None:
    """Plot ``column`` of a results table against sparsity and save it to ``path``.

    The table needs the columns ``model``, ``method``, ``sparsity`` (a fraction) and ``column``;
    ``masks_kept`` and ``untrained`` are read when present. One line per model and method, each
    starting from the model's dense point (see :func:`with_dense_reference`); a method with a
    single sparsity (an N:M pattern) shows as markers. Runs fine-tuned without masks and
    untrained test models are labelled as such in the legend. The x axis is sparsity in percent.

    Raises ``ValueError`` when the table has no rows or lacks ``column``.
    """
    if table.empty:
        raise ValueError(f"no rows to plot for {title!r}: run the measurements first")
    if column not in table.columns:
        raise ValueError(f"results table has no column {column!r}")

    table = with_dense_reference(table)
    table = table.assign(
        masks_kept=table["masks_kept"] if "masks_kept" in table.columns else True,
        untrained=table["untrained"] if "untrained" in table.columns else False,
    )
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.subplots()
    groups = table.groupby(["model", "method", "masks_kept", "untrained"], sort=False, dropna=False)
    for (model, method, masks_kept, untrained), rows in groups:
        rows = rows.sort_values("sparsity")
        ax.plot(
            100.0 * rows["sparsity"],
            rows[column],
            marker="o",
            markersize=4,
            linestyle="-" if masks_kept else "--",
            label=_series_label(model, method, bool(masks_kept), bool(untrained)),
        )
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    figure.suptitle(title)
    save_figure(figure, path)
