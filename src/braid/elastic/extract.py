"""Mix'n'Match extraction: a standalone model with sliced MatFormer FFNs and dropped layers.

Each MatFormer ('F') layer becomes a dense SwiGLU ('-') layer whose hidden width is its
chosen granularity's prefix (mlp.d_ff_per_layer says each layer's width); dropped layers
are removed and the rest renumbered. The weights are copies of the universal model's, so
the extracted model computes exactly what the universal one does at those widths without
those blocks.

Legend: D d_model, M sliced hidden width.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from braid.model.config import ModelConfig
from braid.model.pattern import LayerSpec, format_pattern


def layer_widths(cfg: ModelConfig, width: float | None = None, matformer_widths: Sequence[float] | None = None):
    """Per-layer widths (None where a layer has no MatFormer FFN) from one width or one per 'F' layer."""
    if (width is None) == (matformer_widths is None):
        raise ValueError("give exactly one of a uniform width (--width) or per-layer widths (--widths-per-layer)")
    specs = cfg.layers
    num_matformer = sum(spec.ffn == "matformer" for spec in specs)
    if matformer_widths is None:
        matformer_widths = [width] * num_matformer
    if len(matformer_widths) != num_matformer:
        raise ValueError(
            f"got {len(matformer_widths)} per-layer widths but the model has {num_matformer} MatFormer ('F') "
            f"layers in pattern {format_pattern(specs)!r}; give one width per 'F' layer, in layer order"
        )
    chosen = iter(matformer_widths)
    widths = [next(chosen) if spec.ffn == "matformer" else None for spec in specs]
    for w in matformer_widths:
        cfg.matformer.hidden(w)  # raises on a width that is not a granularity
    return widths


def _kept_layers(cfg: ModelConfig, drop_layers: Sequence[int]) -> list[LayerSpec]:
    specs = cfg.layers
    bad = [i for i in drop_layers if not 0 <= i < len(specs)]
    if bad:
        raise ValueError(f"--drop-layers {bad} out of range: the model has layers 0..{len(specs) - 1}")
    kept = [spec for spec in specs if spec.index not in set(drop_layers)]
    if not kept:
        raise ValueError("--drop-layers removes every layer; keep at least one")
    if drop_layers and cfg.layernorm_scaling:
        raise ValueError(
            "dropping layers of a model with layernorm_scaling=true changes each later layer's "
            "1/sqrt(depth) norm scale, so the result would not be the universal model's; drop none"
        )
    return kept


def extract_config(cfg: ModelConfig, widths: Sequence[float | None], drop_layers: Sequence[int] = ()) -> ModelConfig:
    """The ModelConfig of the submodel: 'F' layers become '-' layers of their sliced width."""
    kept = _kept_layers(cfg, drop_layers)
    new_specs, d_ff_per_layer = [], []
    for j, spec in enumerate(kept):
        d_ff = 0
        if spec.ffn == "matformer":
            d_ff = cfg.matformer.hidden(1.0 if widths[spec.index] is None else widths[spec.index])
        elif spec.ffn == "mlp":
            d_ff = cfg.mlp.hidden(spec.index)
        ffn = "mlp" if spec.ffn == "matformer" else spec.ffn
        new_specs.append(dataclasses.replace(spec, index=j, ffn=ffn))
        d_ff_per_layer.append(d_ff)
    has_dense = any(spec.ffn == "mlp" for spec in new_specs)
    mlp = dataclasses.replace(cfg.mlp, d_ff_per_layer=tuple(d_ff_per_layer) if has_dense else ())
    return cfg.replace(pattern=format_pattern(new_specs), num_layers=None, mlp=mlp)


@torch.no_grad()
def extract_model(model, widths: Sequence[float | None], drop_layers: Sequence[int] = ()):
    """A new Decoder holding copies of `model`'s weights, sliced to `widths`, without `drop_layers`.

    `widths` has one entry per layer of `model` (see `layer_widths`); tensors keep their
    dtype and device.
    """
    from braid.model import build_model

    cfg = model.cfg
    new_cfg = extract_config(cfg, widths, drop_layers)
    kept = _kept_layers(cfg, drop_layers)
    source = model.state_dict()
    state = {k: v.clone() for k, v in source.items() if not k.startswith("layers.")}
    for j, spec in enumerate(kept):
        block = model.layers[str(spec.index)]
        prefix = f"layers.{spec.index}."
        for key, value in source.items():
            if key.startswith(prefix):
                state[f"layers.{j}.{key[len(prefix):]}"] = value.clone()
        if spec.ffn == "matformer":
            width = 1.0 if widths[spec.index] is None else widths[spec.index]
            for key, value in block.ffn.sliced_state_dict(width).items():
                state[f"layers.{j}.ffn.{key}"] = value
    submodel = build_model(new_cfg, device="meta")
    submodel.load_state_dict(state, strict=True, assign=True)
    submodel.train(model.training)
    return submodel


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_standalone(run_cfg, model, out_dir: str | Path, step: int) -> Path:
    """Write OUT/config.yaml and OUT/ckpt/step_N (model weights only), loadable by load_trained."""
    from braid.elastic.policy import ElasticConfig
    from braid.train.checkpoint import COMPLETE, checkpoint_dir
    from braid.train.config import save_config

    out_dir = Path(out_dir)
    cfg = dataclasses.replace(run_cfg, model=model.cfg, out_dir=str(out_dir.resolve()), elastic=ElasticConfig())
    ckpt = checkpoint_dir(out_dir, step)
    if ckpt.exists():
        raise ValueError(f"{str(ckpt)!r} already exists; pass a new --out dir")
    ckpt.mkdir(parents=True)
    save_config(cfg, out_dir / "config.yaml")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt)
    (ckpt / COMPLETE).write_text(json.dumps({"step": step, "extracted": True}))
    return ckpt


def extract_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    width: float | None = None,
    matformer_widths: Sequence[float] | None = None,
    drop_layers: Sequence[int] = (),
) -> dict:
    """Extract a submodel of a run or checkpoint into a standalone run dir; returns a report."""
    from braid.model import num_params
    from braid.train import load_trained

    run = load_trained(ckpt, device="cpu")
    widths = layer_widths(run.cfg.model, width, matformer_widths)
    submodel = extract_model(run.model, widths, drop_layers)
    written = save_standalone(run.cfg, submodel, out_dir, run.step)
    report = {
        "source": str(run.checkpoint),
        "out": str(written),
        "pattern": submodel.cfg.pattern,
        "widths": widths,
        "drop_layers": list(drop_layers),
        "params_source": num_params(run.cfg.model),
        "params_extracted": num_params(submodel.cfg),
        "bytes_source": _dir_bytes(run.checkpoint),
        "bytes_extracted": _dir_bytes(written),
    }
    (Path(out_dir) / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
