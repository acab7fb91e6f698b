"""The table of bench/parallel_gpu.sh: one row per layout from OUT/layouts.tsv and each run's
metrics.jsonl (log.every=1, so one train row per step).

    python3 bench/parallel_summary.py bench_out/parallel

Columns: layout, processes, status, steps logged, max |loss - 1gpu loss| over the first 10
steps against the one-GPU run that read the same global batches (1gpu for tp and pp layouts,
1gpu_dpN, which reads as N data-parallel ranks with data.read_as_dp=N, for layouts with N
data-parallel ranks), median step time after WARMUP steps (tokens per step / tokens_per_s),
median tokens/s, and the largest peak memory (GiB, rank 0's GPU) of any logged step.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COMPARE_STEPS = 10
WARMUP = 3
BASELINE = "1gpu"


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if "loss" in row]


def data_parallel_size(name: str, nproc: int) -> int:
    """tp and pp split each batch; every other factor of the world is data parallel."""
    model_parallel = 1
    for axis in ("tp", "pp"):
        for part in name.split("_"):
            if part.startswith(axis) and part[len(axis) :].isdigit():
                model_parallel *= int(part[len(axis) :])
    return nproc // model_parallel


def baseline_for(name: str, nproc: int) -> str:
    """The one-GPU run that read the same global batches: 1gpu, or 1gpu_dpN (data.read_as_dp=N)."""
    dp = data_parallel_size(name, nproc)
    return BASELINE if dp == 1 else f"{BASELINE}_dp{dp}"


def step_times(rows: list[dict]) -> list[float]:
    times, previous_tokens = [], 0
    for row in rows:
        tokens, rate = row.get("tokens"), row.get("tokens_per_s")
        if isinstance(tokens, (int, float)) and isinstance(rate, (int, float)) and rate > 0:
            times.append((tokens - previous_tokens) / rate)
        previous_tokens = tokens if isinstance(tokens, (int, float)) else previous_tokens
    return times[WARMUP:] or times


def loss_diff(rows: list[dict], base: list[dict]) -> float | None:
    pairs = [
        (r["loss"], b["loss"])
        for r, b in zip(rows[:COMPARE_STEPS], base[:COMPARE_STEPS])
        if r["step"] == b["step"] and isinstance(r["loss"], float) and isinstance(b["loss"], float)
    ]
    return max(abs(a - b) for a, b in pairs) if pairs else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(out: Path) -> str:
    layouts = [line.split("\t") for line in (out / "layouts.tsv").read_text().splitlines() if line.strip()]
    lines = [
        f"| layout | procs | status | steps | max abs loss diff (first {COMPARE_STEPS}) "
        "| vs (same batches) | step time s (median) | tokens/s (median) | peak mem GiB (rank 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, nproc, status, _took, _command in layouts:
        rows = read_rows(out / name)
        times = step_times(rows)
        rates = [r["tokens_per_s"] for r in rows[WARMUP:] if isinstance(r.get("tokens_per_s"), (int, float))]
        peaks = [r["peak_mem_gib"] for r in rows if isinstance(r.get("peak_mem_gib"), (int, float))]
        peak = max(peaks) if peaks else None
        reference = baseline_for(name, int(nproc))
        diff = None if name.startswith(BASELINE) else loss_diff(rows, read_rows(out / reference))
        lines.append(
            f"| {name} | {nproc} | {status} | {len(rows)} | {fmt(diff, '.2e')} | "
            f"{'-' if name.startswith(BASELINE) else reference} | "
            f"{fmt(statistics.median(times) if times else None, '.3f')} | "
            f"{fmt(statistics.median(rates) if rates else None, ',.0f')} | {fmt(peak, '.2f')} |"
        )
    lines.append("")
    lines.append("Commands: " + str(out / "layouts.tsv") + " (5th column); logs: " + str(out) + "/<layout>.log")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 bench/parallel_summary.py OUT_DIR (the OUT of bench/parallel_gpu.sh)")
    print(summarize(Path(sys.argv[1])))
