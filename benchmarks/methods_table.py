"""Print the method comparison of a finished run as a Markdown table.

Reads results/tables/{fidelity,bench,latency,sizes}.csv from a run folder (one made with
config/methods.yaml) and prints one row per model, method and sparsity: zero-shot fidelity,
fine-tuned QNLI accuracy, latency speed-up over the dense model and gzip-compressed size.

    python benchmarks/methods_table.py RUN_FOLDER [--sparsities 0 0.5 0.7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

KEY = ["model", "method", "sparsity"]


def read_table(folder: Path, name: str, columns: list[str], query: str | None = None) -> pd.DataFrame:
    """Read one results table and keep the key columns and ``columns``; empty if it is missing."""
    path = folder / "results" / "tables" / f"{name}.csv"
    if not path.is_file():
        return pd.DataFrame(columns=KEY + columns)
    table = pd.read_csv(path)
    if query:
        table = table.query(query)
    return table[KEY + columns]


def comparison(folder: Path) -> pd.DataFrame:
    """Join the four tables of a run on model, method and sparsity."""
    fidelity = read_table(folder, "fidelity", ["relative_error", "cosine"])
    accuracy = read_table(folder, "bench", ["accuracy"], "task == 'qnli'")
    latency = read_table(folder, "latency", ["speedup"])
    sizes = read_table(folder, "sizes", ["bytes"], "codec == 'gzip'").rename(columns={"bytes": "gzip_mb"})
    sizes["gzip_mb"] = sizes["gzip_mb"] / 1e6
    table = fidelity
    for other in (accuracy, latency, sizes):
        table = table.merge(other, on=KEY, how="outer")
    return table.sort_values(["model", "sparsity", "method"]).reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """Format the comparison as a Markdown table, sparsity in percent."""
    header = "| model | sparsity | method | relative error | cosine | QNLI accuracy | speed-up | gzip MB |"
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in table.itertuples(index=False):
        cells = [
            row.model, f"{100 * row.sparsity:g}%", row.method,
            _number(row.relative_error, 3), _number(row.cosine, 3), _number(row.accuracy, 3),
            _number(row.speedup, 2, "x"), _number(row.gzip_mb, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value, digits: int, suffix: str = "") -> str:
    return "" if pd.isna(value) else f"{value:.{digits}f}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the run folder (contains results/tables/)")
    parser.add_argument("--sparsities", type=float, nargs="*", help="only these sparsities (fractions)")
    arguments = parser.parse_args()

    table = comparison(arguments.folder)
    if arguments.sparsities:
        table = table[table["sparsity"].round(6).isin([round(s, 6) for s in arguments.sparsities])]
    print(markdown(table))


if __name__ == "__main__":
    main()
