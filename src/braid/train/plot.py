"""`braid plot RUN_DIR`: train and validation loss against tokens, as RUN_DIR/loss.png."""

from __future__ import annotations

from pathlib import Path

from braid.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the loss curves of a run (from metrics.jsonl) to `out_path` (default RUN/loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["tokens"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    val = [(r["tokens"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if not train and not val:
        raise ValueError(f"{str(Path(run_dir) / 'metrics.jsonl')!r} has no loss rows yet; train longer first")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    out_path = Path(out_path) if out_path is not None else Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
