"""Data pipeline throughput: `braid data prepare` (tokens/s per tokenizer process) and the
PackedLoader (tokens/s per loader process), on the Gutenberg demo corpus or, when it is
absent, a synthetic corpus of the same size.

    python bench/data.py [--corpus data/gutenberg] [--workers 1 2] [--seq-len 2048 --batch-size 8]

Fetch the corpus first with `braid data corpus gutenberg --out data/gutenberg` (or
`python -m braid.data.cli data corpus gutenberg --out data/gutenberg`).
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from pathlib import Path

from braid.data import PackedLoader, prepare, train_tokenizer


def synthetic_corpus(out: Path, num_bytes: int = 5_000_000) -> Path:
    """Plays-like text: paragraphs of random words from a Zipf-ish vocabulary."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "synthetic.txt", "w") as f:
        written = 0
        while written < num_bytes:
            paragraph = " ".join(rng.choices(words, weights, k=rng.randint(5, 120))) + "\n\n"
            f.write(paragraph)
            written += len(paragraph)
    return out


def bench_prepare(corpus: Path, tokenizer: Path, work: Path, workers: int) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = prepare([corpus], work / f"data-w{workers}", tokenizer, num_workers=workers, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    # With worker processes this process only reads and writes: its CPU time is the
    # ceiling the workers cannot pass, reported apart from the per-process rate.
    return {"stage": f"prepare ({workers} worker{'s' * (workers > 1)})", "tokens": tokens,
            "seconds": seconds, "per_process": tokens / seconds / workers,
            "per_cpu_second": tokens / cpu if workers == 1 else None,
            "writer_per_cpu_second": tokens / cpu if workers > 1 else None}


def bench_loader(data_dir: Path, seq_len: int, batch_size: int, seconds: float) -> dict:
    loader = PackedLoader(data_dir, seq_len=seq_len, batch_size=batch_size, seed=0)
    batches = iter(loader)
    next(batches)  # opens the shards
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for batch in itertools.islice(batches, 10):
            tokens += batch["input_ids"].numel()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"stage": f"loader ({batch_size}x{seq_len})", "tokens": tokens, "seconds": elapsed,
            "per_process": tokens / elapsed, "per_cpu_second": tokens / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/gutenberg"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = args.corpus
        if not list(corpus.glob("*.txt")):
            print(f"{corpus} has no .txt files: using a synthetic corpus")
            corpus = synthetic_corpus(work / "synthetic")
        num_bytes = sum(p.stat().st_size for p in corpus.glob("*.txt"))
        tokenizer = work / "tokenizer.json"
        start = time.perf_counter()
        train_tokenizer([corpus], args.vocab_size, tokenizer)
        print(f"corpus {corpus} ({num_bytes / 1e6:.1f} MB); BPE {args.vocab_size} trained in "
              f"{time.perf_counter() - start:.1f} s")
        rows = [bench_prepare(corpus, tokenizer, work, w) for w in args.workers]
        data_dir = work / f"data-w{args.workers[0]}"
        rows.append(bench_loader(data_dir, args.seq_len, args.batch_size, args.loader_seconds))
    print("| stage | tokens | wall s | tokens/s per process (wall) | tokens per CPU second |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        cpu = "n/a" if row["per_cpu_second"] is None else f"{row['per_cpu_second']:,.0f}"
        print(f"| {row['stage']} | {row['tokens']:,} | {row['seconds']:.2f} | {row['per_process']:,.0f} | {cpu} |")
    for row in rows:
        if row.get("writer_per_cpu_second"):
            print(f"{row['stage']}: the reading/writing main process did {row['writer_per_cpu_second']:,.0f} "
                  "tokens per CPU second (the most any number of workers can reach)")


if __name__ == "__main__":
    main()
