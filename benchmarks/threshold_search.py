"""Benchmark global magnitude pruning: lmprune.pruning against torch.nn.utils.prune.

Builds random float32 weights with the shapes of gpt2-medium's prunable matrices
(no download), prunes them at sparsity 0.5 with
``find_global_threshold`` + ``apply_global_threshold_`` and then, on regenerated
identical weights, with ``torch.nn.utils.prune.global_unstructured`` and
``L1Unstructured``. Both run in this one process, lmprune first. For each it
records the wall time and the extra peak memory: VmHWM after the call minus
VmRSS before it, with VmHWM reset by writing "5" to /proc/self/clear_refs
(Linux only). The results go to the section "Global magnitude threshold search"
of docs/benchmarks.md and, with --output, to a JSON file.

The full size needs about 1.4 GB for the weights plus roughly 18 GB for torch.

Usage:
    python benchmarks/threshold_search.py                       # full size, updates the docs
    python benchmarks/threshold_search.py --scale 0.25 --no-docs   # quick check
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from lmprune.pruning import DEFAULT_CHUNK_NUMEL, apply_global_threshold_, find_global_threshold

SECTION_TITLE = "Global magnitude threshold search"
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SPARSITY = 0.5
SEED = 0
INIT_STD = 0.02  # GPT-2's initializer_range

# Targets for lmprune relative to torch and to the size of the weights.
MIN_SPEEDUP = 10.0
MAX_EXTRA_PEAK_FRACTION = 0.25

# gpt2-medium: vocabulary 50257, 1024 positions, hidden size 1024, 24 layers,
# MLP size 4096. Conv1D weights are stored as (in_features, out_features).
VOCAB_SIZE = 50257
NUM_POSITIONS = 1024
HIDDEN_SIZE = 1024
NUM_LAYERS = 24
MLP_SIZE = 4096


def gpt2_medium_shapes(scale: float) -> list[tuple[int, int]]:
    """Return the prunable weight shapes of gpt2-medium, each dimension multiplied by ``scale``."""

    def dim(size: int) -> int:
        return max(1, round(size * scale))

    hidden, mlp = dim(HIDDEN_SIZE), dim(MLP_SIZE)
    shapes = [(dim(VOCAB_SIZE), hidden), (dim(NUM_POSITIONS), hidden)]
    for _ in range(NUM_LAYERS):
        shapes += [(hidden, 3 * hidden), (hidden, hidden), (hidden, mlp), (mlp, hidden)]
    return shapes


def make_weights(shapes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """Return float32 tensors drawn from N(0, INIT_STD²); the same seed gives the same values."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.empty(shape).normal_(0.0, INIT_STD, generator=generator) for shape in shapes]


def read_status_kib(field: str) -> int:
    """Return a field of /proc/self/status, such as VmRSS or VmHWM, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current VmRSS, and fail if the kernel does not support it."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    if read_status_kib("VmHWM") > read_status_kib("VmRSS") + 1024:
        raise RuntimeError(
            "writing 5 to /proc/self/clear_refs did not reset VmHWM, so peak memory cannot be measured on this kernel"
        )


def measure(function):
    """Run ``function()`` and return (result, wall seconds, extra peak RSS in bytes)."""
    gc.collect()
    reset_peak_rss()
    rss_before = read_status_kib("VmRSS")
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    extra_peak = (read_status_kib("VmHWM") - rss_before) * 1024
    return result, seconds, extra_peak


def prune_with_lmprune(weights: list[torch.Tensor]) -> tuple[float, float]:
    """Prune ``weights`` in place; return the threshold and the seconds spent finding it."""
    start = time.perf_counter()
    threshold = find_global_threshold(weights, SPARSITY)
    find_seconds = time.perf_counter() - start
    apply_global_threshold_(weights, threshold)
    return threshold.threshold, find_seconds


def prune_with_torch(weights: list[torch.Tensor]) -> list[nn.Module]:
    """Prune ``weights`` with torch's global_unstructured; return the modules that hold the masks."""
    holders = []
    for weight in weights:
        holder = nn.Module()
        holder.weight = nn.Parameter(weight)
        holders.append(holder)
    prune.global_unstructured(
        [(holder, "weight") for holder in holders], pruning_method=prune.L1Unstructured, amount=SPARSITY
    )
    return holders


def compare_torch_masks(holders: list[nn.Module], threshold: float) -> dict:
    """Check torch's masks against ``threshold``: every ``|w| < threshold`` pruned, every ``|w| > threshold`` kept.

    Only the weights equal to ``threshold`` may be split differently, because
    torch's topk breaks ties in no documented order.
    """
    violations = 0
    ties = 0
    for holder in holders:
        magnitude = holder.weight_orig.detach().abs()
        pruned = holder.weight_mask == 0
        violations += int(torch.count_nonzero(pruned & (magnitude > threshold)))
        violations += int(torch.count_nonzero(~pruned & (magnitude < threshold)))
        ties += int(torch.count_nonzero(magnitude == threshold))
    return {"violations": violations, "weights_equal_to_threshold": ties}


def machine_info() -> dict:
    """Describe the CPU, memory and software this run used."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        mem_total_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    return {
        "cpu_model": cpu_model,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(mem_total_kib / 2**20, 1),
        "load_average_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_benchmark(scale: float) -> dict:
    """Measure both implementations on the same weights and return the results."""
    shapes = gpt2_medium_shapes(scale)
    num_weights = sum(rows * cols for rows, cols in shapes)
    weights_bytes = num_weights * 4
    print(f"{len(shapes)} tensors, {num_weights} values, {weights_bytes / 2**30:.2f} GiB", flush=True)

    weights = make_weights(shapes, SEED)
    (threshold, find_seconds), ours_seconds, ours_peak = measure(lambda: prune_with_lmprune(weights))
    ours_zeros = [weight.numel() - int(torch.count_nonzero(weight)) for weight in weights]
    print(f"lmprune: {ours_seconds:.2f} s, extra peak {ours_peak / 2**20:.0f} MiB", flush=True)
    del weights

    weights = make_weights(shapes, SEED)
    holders, torch_seconds, torch_peak = measure(lambda: prune_with_torch(weights))
    print(f"torch:   {torch_seconds:.2f} s, extra peak {torch_peak / 2**20:.0f} MiB", flush=True)
    torch_zeros = [holder.weight_mask.numel() - int(torch.count_nonzero(holder.weight_mask)) for holder in holders]
    mask_check = compare_torch_masks(holders, threshold)
    del holders, weights

    return {
        "scale": scale,
        "sparsity": SPARSITY,
        "num_tensors": len(shapes),
        "num_weights": num_weights,
        "weights_bytes": weights_bytes,
        "chunk_numel": DEFAULT_CHUNK_NUMEL,
        "lmprune": {
            "seconds": ours_seconds,
            "find_seconds": find_seconds,
            "extra_peak_bytes": ours_peak,
            "zeros": sum(ours_zeros),
            "threshold": threshold,
        },
        "torch": {"seconds": torch_seconds, "extra_peak_bytes": torch_peak, "zeros": sum(torch_zeros)},
        "expected_zeros": round(SPARSITY * num_weights),
        "zeros_per_tensor_equal": ours_zeros == torch_zeros,
        "torch_mask_violations": mask_check["violations"],
        "weights_equal_to_threshold": mask_check["weights_equal_to_threshold"],
        "speedup": torch_seconds / ours_seconds,
        "lmprune_extra_peak_fraction": ours_peak / weights_bytes,
        "torch_extra_peak_fraction": torch_peak / weights_bytes,
    }


def format_section(results: dict, command: str) -> str:
    """Return the Markdown section for docs/benchmarks.md."""
    machine = results["machine"]
    ours, theirs = results["lmprune"], results["torch"]
    speed_met = results["speedup"] >= MIN_SPEEDUP
    memory_met = results["lmprune_extra_peak_fraction"] <= MAX_EXTRA_PEAK_FRACTION

    def gib(num_bytes: int) -> str:
        return f"{num_bytes / 2**30:.2f} GiB"

    def yes_no(flag: bool) -> str:
        return "yes" if flag else "no"

    return f"""## {SECTION_TITLE}

Global unstructured L1 magnitude pruning at sparsity {results["sparsity"]} of
{results["num_tensors"]} random float32 tensors with the shapes of gpt2-medium's
prunable weights, each dimension scaled by {results["scale"]}
({results["num_weights"]:,} values, {gib(results["weights_bytes"])}).
lmprune runs `find_global_threshold` then `apply_global_threshold_`
(chunk_numel {results["chunk_numel"]:,}). torch runs
`torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured)`
on regenerated, identical weights in the same process. Extra peak memory is
VmHWM after the call minus VmRSS before it, with VmHWM reset through
`/proc/self/clear_refs`. For torch it includes what stays allocated after the
call: per weight a float mask buffer and the masked copy that
`torch.nn.utils.prune` stores as the module's `weight`, together twice the
weights' size. lmprune writes zeros into the weights and keeps nothing.

Command (run on {results["date"]}):

```
{command}
```

Machine: {machine["cpu_model"]}, {machine["cpu_cores"]} cores ({machine["torch_threads"]} torch threads),
{machine["ram_gib"]} GiB RAM, 1-minute load average {machine["load_average_1min_at_start"]:.2f} at start,
Python {machine["python"]}, torch {machine["torch"]}.

| | lmprune | torch |
|---|---|---|
| wall time | {ours["seconds"]:.2f} s (threshold search {ours["find_seconds"]:.2f} s) | {theirs["seconds"]:.2f} s |
| extra peak memory | {gib(ours["extra_peak_bytes"])} | {gib(theirs["extra_peak_bytes"])} |
| extra peak / weights size | {results["lmprune_extra_peak_fraction"]:.3f} | {results["torch_extra_peak_fraction"]:.2f} |
| zeros | {ours["zeros"]:,} | {theirs["zeros"]:,} |

- Speed ratio (torch time / lmprune time): {results["speedup"]:.1f}×.
  Target at least {MIN_SPEEDUP:.0f}×: {"met" if speed_met else "not met"}.
- lmprune extra peak memory / weights size: {results["lmprune_extra_peak_fraction"]:.3f}.
  Target at most {MAX_EXTRA_PEAK_FRACTION}: {"met" if memory_met else "not met"}.
- Expected zeros round({results["sparsity"]} × N) = {results["expected_zeros"]:,}.
- torch's mask prunes every weight with |w| below lmprune's threshold
  ({ours["threshold"]!r}) and keeps every weight above it:
  {yes_no(results["torch_mask_violations"] == 0)} ({results["torch_mask_violations"]} weights on the wrong side).
- Weights equal to the threshold: {results["weights_equal_to_threshold"]}. torch's topk
  may split these differently from lmprune's tensor-then-index order.
  Per-tensor zero counts equal: {yes_no(results["zeros_per_tensor_equal"])}.
"""


def update_docs(path: Path, section: str) -> None:
    """Replace the benchmark's section in ``path`` or append it, creating the file if missing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="factor applied to every dimension of the gpt2-medium shapes; the value count scales by its square (default 1.0)",
    )
    parser.add_argument("--output", type=Path, help="write the results to this JSON file")
    parser.add_argument("--docs", type=Path, default=DOCS_PATH, help=f"Markdown page to update (default {DOCS_PATH})")
    parser.add_argument("--no-docs", action="store_true", help="do not update the Markdown page")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv])
    machine = machine_info()
    results = run_benchmark(args.scale)
    results["machine"] = machine
    results["date"] = datetime.date.today().isoformat()
    results["command"] = command

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_docs:
        update_docs(args.docs, format_section(results, command))

    expected = results["expected_zeros"]
    matched = (
        results["lmprune"]["zeros"] == expected
        and results["torch"]["zeros"] == expected
        and results["torch_mask_violations"] == 0
    )
    if not matched:
        print(
            f"results differ: expected {expected} zeros, lmprune has {results['lmprune']['zeros']}, "
            f"torch has {results['torch']['zeros']}, {results['torch_mask_violations']} torch mask violations",
            file=sys.stderr,
        )
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
