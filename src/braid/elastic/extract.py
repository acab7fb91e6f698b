"""Mix'n'Match extraction: a standalone model with sliced MatFormer FFNs, sliced mixer
heads and dropped layers.

Each MatFormer ('F') layer becomes a dense SwiGLU ('-') layer whose hidden width is its
chosen granularity's prefix (mlp.d_ff_per_layer says each layer's width). With a heads
fraction, each attention layer keeps its first KV heads with their query heads
(attention.kv_heads_per_layer) and each Mamba-2 layer its first B/C groups with their heads
(mamba2.groups_per_layer). Dropped layers are removed and the rest renumbered. The weights
are copies of the universal model's, so the extracted model computes exactly what the
universal one does at those widths and heads without those blocks.

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

from braid.model.block import NESTED_HEAD_MIXERS
from braid.model.config import ModelConfig, nested_count
from braid.model.pattern import LayerSpec, format_pattern

LayerValues = Sequence[float | None]


def layer_widths(cfg: ModelConfig, width: float | None = None, matformer_widths: Sequence[float] | None = None):
    """Per-layer widths (None where a layer has no MatFormer FFN) from one width or one per 'F'
    layer; neither means the full width 1.0."""
    if width is not None and matformer_widths is not None:
        raise ValueError("give exactly one of a uniform width (--width) or per-layer widths (--widths-per-layer)")
    specs = cfg.layers
    num_matformer = sum(spec.ffn == "matformer" for spec in specs)
    if width is None and matformer_widths is None:
        width = 1.0
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


def layer_heads(cfg: ModelConfig, heads: float | None = None, per_layer: Sequence[float] | None = None):
    """Per-layer heads fractions (None where a layer's mixer has no nested heads) from one
    fraction or one per attention / Mamba-2 layer; neither means None (no slicing)."""
    if heads is not None and per_layer is not None:
        raise ValueError("give at most one of a uniform heads fraction (--heads) or per-layer ones (--heads-per-layer)")
    specs = cfg.layers
    nested = [spec for spec in specs if spec.mixer in NESTED_HEAD_MIXERS]
    if heads is None and per_layer is None:
        return [None] * len(specs)
    if per_layer is None:
        per_layer = [heads] * len(nested)
    if len(per_layer) != len(nested):
        raise ValueError(
            f"got {len(per_layer)} per-layer heads fractions but the model has {len(nested)} attention / Mamba-2 "
            f"layers in pattern {format_pattern(specs)!r}; give one fraction per such layer, in layer order"
        )
    chosen = dict(zip((spec.index for spec in nested), per_layer))
    for spec in nested:
        _kept_heads(cfg, spec, chosen[spec.index])  # raises on a fraction that does not nest
    return [chosen.get(spec.index) for spec in specs]


def _kept_heads(cfg: ModelConfig, spec: LayerSpec, fraction: float | None) -> int:
    """KV heads (attention) or B/C groups (Mamba-2) a layer keeps at `fraction` (None: all)."""
    if spec.mixer == "mamba2":
        total, what = cfg.mamba2.layer_groups(spec.index), f"Mamba-2 B/C groups (layer {spec.index})"
    else:
        total, what = cfg.attention.layer_heads(spec.index)[1], f"KV heads (layer {spec.index})"
    return total if fraction is None else nested_count(fraction, total, what)


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


def extract_config(
    cfg: ModelConfig, widths: LayerValues, drop_layers: Sequence[int] = (), heads: LayerValues | None = None
) -> ModelConfig:
    """The ModelConfig of the submodel: 'F' layers become '-' layers of their sliced width;
    attention and Mamba-2 layers keep their first `heads` KV heads / B/C groups."""
    kept = _kept_layers(cfg, drop_layers)
    heads = heads if heads is not None else [None] * len(cfg.layers)
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
    attention, mamba2 = _head_configs(cfg, kept, heads)
    return cfg.replace(pattern=format_pattern(new_specs), num_layers=None, mlp=mlp, attention=attention, mamba2=mamba2)


def _head_configs(cfg: ModelConfig, kept: list[LayerSpec], heads: LayerValues):
    """attention / mamba2 configs with per-layer counts for the kept layers, set when heads are
    sliced or the source already has per-layer counts (they must follow the renumbering)."""
    attention, mamba2 = cfg.attention, cfg.mamba2
    sliced = any(h is not None for h in heads)
    kv = [_kept_heads(cfg, s, heads[s.index]) if s.mixer in ("attention", "sliding") else 0 for s in kept]
    groups = [_kept_heads(cfg, s, heads[s.index]) if s.mixer == "mamba2" else 0 for s in kept]
    if any(kv) and (sliced or attention.kv_heads_per_layer):
        # The head dim must not follow d_model / num_heads of the smaller head count.
        attention = dataclasses.replace(
            attention, kv_heads_per_layer=tuple(kv), head_dim=attention.resolved_head_dim(cfg.d_model)
        )
    else:
        attention = dataclasses.replace(attention, kv_heads_per_layer=())
    if any(groups) and (sliced or mamba2.groups_per_layer):
        mamba2 = dataclasses.replace(mamba2, groups_per_layer=tuple(groups))
    else:
        mamba2 = dataclasses.replace(mamba2, groups_per_layer=())
    return attention, mamba2


@torch.no_grad()
def extract_model(model, widths: LayerValues, drop_layers: Sequence[int] = (), heads: LayerValues | None = None):
    """A new Decoder holding copies of `model`'s weights, sliced to `widths` and `heads`,
    without `drop_layers`.

    `widths` and `heads` have one entry per layer of `model` (see `layer_widths`,
    `layer_heads`; heads None: every head); tensors keep their dtype and device.
    """
    from braid.model import build_model

    cfg = model.cfg
    heads = heads if heads is not None else [None] * len(cfg.layers)
    new_cfg = extract_config(cfg, widths, drop_layers, heads)
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
        if heads[spec.index] is not None:
            for key, value in block.mixer.sliced_state_dict(heads[spec.index]).items():
                state[f"layers.{j}.mixer.{key}"] = value
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
    heads: float | None = None,
    heads_per_layer: Sequence[float] | None = None,
) -> dict:
    """Extract a submodel of a run or checkpoint into a standalone run dir; returns a report."""
    from braid.model import num_params
    from braid.train import load_trained

    run = load_trained(ckpt, device="cpu")
    widths = layer_widths(run.cfg.model, width, matformer_widths)
    layer_fractions = layer_heads(run.cfg.model, heads, heads_per_layer)
    submodel = extract_model(run.model, widths, drop_layers, layer_fractions)
    written = save_standalone(run.cfg, submodel, out_dir, run.step)
    report = {
        "source": str(run.checkpoint),
        "out": str(written),
        "pattern": submodel.cfg.pattern,
        "widths": widths,
        "heads": layer_fractions,
        "drop_layers": list(drop_layers),
        "params_source": num_params(run.cfg.model),
        "params_extracted": num_params(submodel.cfg),
        "bytes_source": _dir_bytes(run.checkpoint),
        "bytes_extracted": _dir_bytes(written),
    }
    (Path(out_dir) / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
