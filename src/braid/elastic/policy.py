"""Elastic training policies: which nested submodels each optimizer step trains.

A submodel sits on up to two nested axes: the MatFormer FFN width (`granularities`, of the
'F' layers) and, with `elastic.heads`, the nested-heads fraction of the attention (KV heads
with their query heads) and Mamba-2 (B/C groups with their heads) layers.

A policy maps a step to a list of (submodel, loss weight) pairs; the step runs one forward
and backward per pair on the same batch and sums the weighted losses. A submodel is a width
(a float, or None for the full model) when only the FFN axis is elastic, and a
braid.model.Submodel(ffn=width, heads=fraction) when `elastic.heads` is set. The choice for
step s is a pure function of (seed, s), so a resumed run trains exactly the submodels it
would have trained without the interruption, and every data-parallel / TP rank agrees on it
without communication.

    none      [(None, 1)]: the full model only (no elastic training).
    all       every granularity (x every heads fraction), weights normalised to sum 1
              (MatFormer's joint loss; heads fractions weigh equally).
              Cost: len(granularities) * len(heads) forward+backward passes per step.
    sample    one granularity per step, drawn with probability proportional to its
              weight, and one heads fraction, drawn uniformly; loss weight 1.
              Cost: one pass per step (at most the full model's).
    sandwich  the largest (full width, all heads), the smallest (smallest width, fewest
              heads) and one random intermediate on each axis (BigNAS / slimmable
              "sandwich rule"), equal loss weights 1/3.
              Cost: three passes per step; the extremes bound every submodel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("none", "all", "sample", "sandwich")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_ladder(values: tuple[float, ...], name: str) -> None:
    _require(list(values) == sorted(set(values)), f"{name}={values} must be increasing and without repeats")


@dataclass
class ElasticConfig:
    """The `elastic:` section of a TrainConfig.

    granularities: widths to train (empty: the model's matformer.granularities); each
        must be one of the model's matformer.granularities.
    weights: one per granularity (empty: uniform); loss weights for `all`, sampling
        weights for `sample`; unused by `sandwich`.
    heads: nested-heads fractions to train jointly with the widths (empty: every head,
        always); increasing, ending with 1.0, each a whole number of every attention
        layer's KV heads and every Mamba-2 layer's B/C groups (e.g. [0.5, 1.0]).
    seed: with the step, fixes the submodels of every step.
    """

    policy: str = "none"
    granularities: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    heads: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        self.granularities = tuple(float(g) for g in self.granularities)  # YAML gives lists
        self.weights = tuple(float(w) for w in self.weights)
        self.heads = tuple(float(h) for h in self.heads)
        _require(self.policy in POLICIES, f"elastic.policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        _check_ladder(self.granularities, "elastic.granularities")
        _require(all(w > 0 for w in self.weights), f"elastic.weights={self.weights} must all be positive")
        if self.weights and self.granularities:
            _require(
                len(self.weights) == len(self.granularities),
                f"elastic.weights has {len(self.weights)} entries but elastic.granularities has "
                f"{len(self.granularities)}; give one weight per granularity or none (uniform)",
            )
        if self.heads:
            _check_ladder(self.heads, "elastic.heads")
            _require(
                0 < self.heads[0] and self.heads[-1] == 1.0,
                f"elastic.heads={self.heads} must be fractions in (0, 1] ending with 1.0 (every head)",
            )

    def resolve(self, model_granularities: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(granularities, weights) after defaults, checked against the model's granularities."""
        grans = self.granularities or tuple(model_granularities)
        unknown = [g for g in grans if g not in model_granularities]
        _require(
            not unknown,
            f"elastic.granularities {unknown} are not in model.matformer.granularities="
            f"{tuple(model_granularities)}; add them there or drop them here",
        )
        weights = self.weights or (1.0,) * len(grans)
        _require(
            len(weights) == len(grans),
            f"elastic.weights has {len(weights)} entries but there are {len(grans)} granularities "
            f"{grans}; give one weight per granularity or none (uniform)",
        )
        return grans, weights


class ElasticPolicy:
    """The (submodel, loss weight) pairs of every step; see the module docstring.

    `model_granularities`: the model's matformer.granularities, or () for a model without
    MatFormer layers (then only the heads axis is elastic and the FFN width is None).
    """

    def __init__(self, cfg: ElasticConfig, model_granularities: tuple[float, ...]):
        self.policy = cfg.policy
        self.seed = cfg.seed
        self.heads = cfg.heads
        if model_granularities:
            self.granularities, weights = cfg.resolve(tuple(model_granularities))
        else:
            _require(
                not cfg.granularities and not cfg.weights,
                "elastic.granularities / elastic.weights need MatFormer ('F') layers; leave them empty",
            )
            self.granularities, weights = (None,), (1.0,)
        total = sum(weights)
        self.probs = tuple(w / total for w in weights)
        if self.policy == "sandwich":
            _require(
                len(self.granularities) >= 2 or len(self.heads) >= 2,
                f"elastic.policy=sandwich needs at least two granularities or heads fractions, got "
                f"{self.granularities} and {self.heads}",
            )

    def widths(self, step: int) -> list[tuple[object, float]]:
        """The (submodel, loss weight) pairs to train at optimizer step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.policy == "none":
            return [(None, 1.0)]
        heads = self.heads or (None,)
        if self.policy == "all":
            return [
                (self._submodel(w, h), p / len(heads)) for w, p in zip(self.granularities, self.probs) for h in heads
            ]
        rng = np.random.default_rng((self.seed, step))
        if self.policy == "sample":
            width = self.granularities[int(rng.choice(len(self.granularities), p=self.probs))]
            head = heads[int(rng.integers(len(heads)))] if self.heads else None
            return [(self._submodel(width, head), 1.0)]
        return self._sandwich(rng, heads)

    def _sandwich(self, rng: np.random.Generator, heads: tuple) -> list[tuple[object, float]]:
        largest = self._submodel(self.granularities[-1], heads[-1])
        smallest = self._submodel(self.granularities[0], heads[0])
        middle = self._submodel(_pick_middle(rng, self.granularities), _pick_middle(rng, heads) if self.heads else None)
        return [(submodel, 1.0 / 3.0) for submodel in (largest, smallest, middle)]

    def _submodel(self, width, heads):
        if not self.heads:
            return width
        from braid.model.decoder import Submodel

        return Submodel(ffn=width, heads=heads)


def _pick_middle(rng: np.random.Generator, ladder: tuple):
    # With two values there is no intermediate: the random pick is one of the extremes.
    pool = ladder[1:-1] or ladder
    return pool[int(rng.integers(len(pool)))]


def build_policy(elastic: ElasticConfig, model_cfg) -> ElasticPolicy:
    """The policy of a run; ValueError when an elastic policy meets a model without MatFormer
    layers (and no elastic heads) or heads fractions that do not nest in the model's mixers."""
    has_matformer = any(spec.ffn == "matformer" for spec in model_cfg.layers)
    if elastic.policy != "none" and not has_matformer and not elastic.heads:
        raise ValueError(
            f"elastic.policy={elastic.policy!r} needs MatFormer ('F') layers in model.pattern="
            f"{model_cfg.pattern!r} or elastic.heads; add 'F' FFNs, set elastic.heads or set elastic.policy=none"
        )
    if elastic.heads:
        _check_heads(elastic.heads, model_cfg)
    return ElasticPolicy(elastic, model_cfg.matformer.granularities if has_matformer else ())


def _check_heads(heads: tuple[float, ...], model_cfg) -> None:
    from braid.model.block import NESTED_HEAD_MIXERS
    from braid.model.config import nested_count

    nested = [spec for spec in model_cfg.layers if spec.mixer in NESTED_HEAD_MIXERS]
    _require(
        bool(nested),
        f"elastic.heads={heads} needs attention or Mamba-2 layers in model.pattern={model_cfg.pattern!r}",
    )
    for spec in nested:
        if spec.mixer == "mamba2":
            total, what = model_cfg.mamba2.layer_groups(spec.index), "Mamba-2 B/C groups (mamba2.n_groups)"
        else:
            total, what = model_cfg.attention.layer_heads(spec.index)[1], "KV heads (attention.num_kv_heads)"
        for fraction in heads:
            nested_count(fraction, total, f"{what} of layer {spec.index}, in elastic.heads")
