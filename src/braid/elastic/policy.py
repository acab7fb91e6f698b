"""MatFormer training policies: which nested FFN widths each optimizer step trains.

A policy maps a step to a list of (width, loss weight) pairs; the step runs one forward
and backward per pair on the same batch and sums the weighted losses. The choice for step
s is a pure function of (seed, s), so a resumed run trains exactly the widths it would
have trained without the interruption, and every data-parallel / TP rank agrees on it
without communication.

    none      [(None, 1)]: the full model only (no elastic training).
    all       every granularity, weights normalised to sum 1 (MatFormer's joint loss).
              Cost: len(granularities) forward+backward passes per step.
    sample    one granularity per step, drawn with probability proportional to its
              weight; loss weight 1. Cost: one pass per step (at most the full width's).
    sandwich  the largest, the smallest and one random intermediate granularity
              (BigNAS / slimmable "sandwich rule"), equal loss weights 1/3.
              Cost: three passes per step; the extremes bound every submodel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("none", "all", "sample", "sandwich")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ElasticConfig:
    """The `elastic:` section of a TrainConfig.

    granularities: widths to train (empty: the model's matformer.granularities); each
        must be one of the model's matformer.granularities.
    weights: one per granularity (empty: uniform); loss weights for `all`, sampling
        weights for `sample`; unused by `sandwich`.
    seed: with the step, fixes the widths of every step.
    """

    policy: str = "none"
    granularities: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        self.granularities = tuple(float(g) for g in self.granularities)  # YAML gives lists
        self.weights = tuple(float(w) for w in self.weights)
        _require(self.policy in POLICIES, f"elastic.policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        _require(
            list(self.granularities) == sorted(set(self.granularities)),
            f"elastic.granularities={self.granularities} must be increasing and without repeats",
        )
        _require(all(w > 0 for w in self.weights), f"elastic.weights={self.weights} must all be positive")
        if self.weights and self.granularities:
            _require(
                len(self.weights) == len(self.granularities),
                f"elastic.weights has {len(self.weights)} entries but elastic.granularities has "
                f"{len(self.granularities)}; give one weight per granularity or none (uniform)",
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
    """The (width, loss weight) pairs of every step; see the module docstring."""

    def __init__(self, cfg: ElasticConfig, model_granularities: tuple[float, ...]):
        self.policy = cfg.policy
        self.seed = cfg.seed
        self.granularities, weights = cfg.resolve(tuple(model_granularities))
        total = sum(weights)
        self.probs = tuple(w / total for w in weights)
        if self.policy == "sandwich":
            _require(
                len(self.granularities) >= 2,
                f"elastic.policy=sandwich needs at least two granularities, got {self.granularities}",
            )

    def widths(self, step: int) -> list[tuple[float | None, float]]:
        """The (width, loss weight) pairs to train at optimizer step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.policy == "none":
            return [(None, 1.0)]
        if self.policy == "all":
            return list(zip(self.granularities, self.probs))
        rng = np.random.default_rng((self.seed, step))
        if self.policy == "sample":
            return [(self.granularities[int(rng.choice(len(self.granularities), p=self.probs))], 1.0)]
        return self._sandwich(rng)

    def _sandwich(self, rng: np.random.Generator) -> list[tuple[float | None, float]]:
        smallest, largest = self.granularities[0], self.granularities[-1]
        middle = self.granularities[1:-1]
        # With two granularities there is no intermediate: the random pick is one of the extremes.
        pool = middle or self.granularities
        chosen = [largest, smallest, pool[int(rng.integers(len(pool)))]]
        return [(width, 1.0 / 3.0) for width in chosen]


def build_policy(elastic: ElasticConfig, model_cfg) -> ElasticPolicy:
    """The policy of a run; ValueError when an elastic policy meets a model without MatFormer layers."""
    if elastic.policy != "none" and not any(spec.ffn == "matformer" for spec in model_cfg.layers):
        raise ValueError(
            f"elastic.policy={elastic.policy!r} needs MatFormer ('F') layers in model.pattern="
            f"{model_cfg.pattern!r}; add 'F' FFNs or set elastic.policy=none"
        )
    return ElasticPolicy(elastic, model_cfg.matformer.granularities)
