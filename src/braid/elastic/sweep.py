"""The Pareto sweep: validation loss of uniform and Mix'n'Match submodels vs their size.

Each candidate is extracted (braid.elastic.extract) and evaluated on the same val batches;
sweep.csv lists (name, widths, heads, params, val_loss) and pareto.png plots every candidate
with the Pareto front (no other candidate is both smaller and better) drawn through it.
With nested heads fractions (the run's elastic.heads, or --heads), every uniform width is
also evaluated at every fraction below 1 (uniform over the attention and Mamba-2 layers).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from braid.model.config import ModelConfig


def candidate_mixes(cfg: ModelConfig, heads: tuple[float, ...] = ()) -> list[tuple[str, list[float], float]]:
    """(name, one width per MatFormer layer, heads fraction): every uniform width, then for
    each pair of adjacent granularities the two half-and-half mixes (small first, large
    first), all with every head; then every uniform width at each heads fraction below 1."""
    num_matformer = sum(spec.ffn == "matformer" for spec in cfg.layers)
    reduced_heads = [h for h in heads if h < 1.0]
    if num_matformer == 0 and not reduced_heads:
        raise ValueError(
            f"model pattern {cfg.pattern!r} has no MatFormer ('F') layers and no heads fractions below 1 to sweep"
        )
    grans = tuple(cfg.matformer.granularities) if num_matformer else (1.0,)
    mixes = [(f"uniform {g:g}", [g] * num_matformer, 1.0) for g in grans]
    half = num_matformer // 2
    if half:
        for small, large in zip(grans, grans[1:]):
            mixes.append((f"{small:g} then {large:g}", [small] * half + [large] * (num_matformer - half), 1.0))
            mixes.append((f"{large:g} then {small:g}", [large] * half + [small] * (num_matformer - half), 1.0))
    for h in reduced_heads:
        mixes.extend((f"uniform {g:g} heads {h:g}", [g] * num_matformer, h) for g in grans)
    return mixes


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats in both params (fewer) and val_loss (lower), by size."""
    front, best = [], float("inf")
    for row in sorted(rows, key=lambda r: (r["params"], r["val_loss"])):
        if row["val_loss"] < best:
            front.append(row)
            best = row["val_loss"]
    return front


def sweep(
    ckpt: str | Path,
    data_dir: str,
    out_dir: str | Path | None = None,
    batches: int = 8,
    heads: tuple[float, ...] | None = None,
) -> dict:
    """Evaluate every candidate mix of a run on `data_dir`'s val split; writes CSV and PNG.

    heads: nested-heads fractions to sweep (None: the run's elastic.heads).
    """
    from braid.elastic.extract import extract_model, layer_heads, layer_widths
    from braid.model import num_params
    from braid.train import evaluate, load_trained, val_batches
    from braid.train.checkpoint import run_dir_of

    run = load_trained(ckpt, device="cpu")
    out_dir = Path(out_dir) if out_dir is not None else run_dir_of(run.checkpoint) / "elastic"
    out_dir.mkdir(parents=True, exist_ok=True)
    val = val_batches(run.cfg.data, batches, data_dir=data_dir)
    rows = []
    model_cfg = run.cfg.model
    heads = tuple(run.cfg.elastic.heads if heads is None else heads)
    for name, matformer_widths, fraction in candidate_mixes(model_cfg, heads):
        widths = layer_widths(model_cfg, matformer_widths=matformer_widths)
        fractions = layer_heads(model_cfg, fraction) if fraction < 1.0 else None
        submodel = extract_model(run.model, widths, heads=fractions)
        result = evaluate(submodel, val, torch.device("cpu"))
        rows.append({
            "name": name,
            "widths": " ".join(f"{w:g}" for w in matformer_widths),
            "heads": f"{fraction:g}",
            "params": num_params(submodel.cfg),
            "val_loss": result["val_loss"],
        })
    front = pareto_front(rows)
    csv_path = out_dir / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "pareto"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "pareto": row in front})
    png_path = plot_front(rows, front, out_dir / "pareto.png")
    return {"csv": csv_path, "png": png_path, "rows": rows, "front": front}


def plot_front(rows: list[dict], front: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["params"] for r in rows], [r["val_loss"] for r in rows], color="0.6", label="submodels")
    ax.plot([r["params"] for r in front], [r["val_loss"] for r in front], "o-", color="C0", label="Pareto front")
    for row in front:
        point = (row["params"], row["val_loss"])
        ax.annotate(row["name"], point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
