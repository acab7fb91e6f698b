"""The decoder: embedding, a ModuleDict of blocks keyed "0".."n-1", final norm, head.

Embedding, final norm and head are optional so that a pipeline stage is a slice of the
same class (torchtitan's composability pattern). Shapes: B batch, T time, D d_model,
V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from braid.model.block import Block
from braid.model.config import ModelConfig
from braid.model.norm import RMSNorm

Widths = float | Sequence[float | None] | dict[int, float] | None


@dataclass(frozen=True)
class Submodel:
    """An elastic submodel on two nested axes, each for every layer (a float), per layer (a
    sequence of num_layers entries or a dict layer index -> value) or None (full).

    ffn: MatFormer FFN width (one of matformer.granularities) of the 'F' layers.
    heads: fraction of the nested heads of attention (KV heads with their query heads) and
        Mamba-2 (B/C groups with their heads) layers; a multiple of 1 / the layer's count.
    """

    ffn: Widths = None
    heads: Widths = None


class Decoder(nn.Module):
    """A hybrid decoder built from `cfg`; `layer_ids` picks a contiguous slice of blocks."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layer_ids: Sequence[int] | None = None,
        embed: bool = True,
        head: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        specs = cfg.layers
        layer_ids = range(len(specs)) if layer_ids is None else layer_ids
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model) if embed else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, specs[i]) for i in layer_ids})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if head else None
        self.output = None
        if head and not (cfg.tie_embeddings and embed):
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if head and cfg.tie_embeddings and not embed:
            raise ValueError("tie_embeddings needs the embedding and the head in the same module (stage)")

    def forward(
        self,
        tokens_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
        *,
        widths: Widths | Submodel = None,
        caches: list | None = None,
        return_aux: bool = False,
        return_hidden: bool = False,
    ):
        """Logits (B, T, V); with `return_aux`, also the weighted auxiliary losses.

        tokens_BT: token ids, or hidden states (B, T, D) when this module has no embedding.
        doc_ids_BT: document id per token for packed sequences (no state or attention
            crosses a document boundary).
        widths: MatFormer width for every layer (a float), per layer (a sequence of
            num_layers entries or a dict layer index -> width); None is full width. A
            `Submodel` gives the FFN widths and the nested-heads fractions together.
        caches: from `new_caches`, for incremental decoding; updated in place.
        return_hidden: return the final-normed hidden states (B, T, D) instead of logits.
        """
        if caches is not None and doc_ids_BT is not None:
            raise ValueError("doc_ids cannot be combined with an inference cache: decode one document per row")
        h_BTD = self.tok_embeddings(tokens_BT) if self.tok_embeddings is not None else tokens_BT
        aux_totals: dict[str, torch.Tensor] = {}
        ffn, heads = (widths.ffn, widths.heads) if isinstance(widths, Submodel) else (widths, None)
        for key, block in self.layers.items():
            i = int(key)
            cache = caches[i] if caches is not None else None
            h_BTD, aux = block(h_BTD, doc_ids_BT, cache, self._width(ffn, i), self._width(heads, i, "heads"))
            for name, value in aux.items():
                aux_totals[name] = aux_totals.get(name, 0.0) + value
        out = self._head(h_BTD, return_hidden)
        if not return_aux:
            return out
        return out, self._weight_aux(aux_totals)

    def _head(self, h_BTD: torch.Tensor, return_hidden: bool) -> torch.Tensor:
        if self.norm is None:
            return h_BTD
        h_BTD = self.norm(h_BTD)
        if return_hidden:
            return h_BTD
        return nn.functional.linear(h_BTD, self.head_weight)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.output.weight if self.output is not None else self.tok_embeddings.weight

    def _weight_aux(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        coef = {"load_balance": self.cfg.moe.load_balance_coef, "z_loss": self.cfg.moe.z_loss_coef}
        return {f"moe_{name}": coef[name] * value for name, value in totals.items()}

    def _width(self, widths: Widths, layer: int, name: str = "widths") -> float | None:
        if widths is None or isinstance(widths, (int, float)):
            return widths
        if isinstance(widths, dict):
            return widths.get(layer)
        if len(widths) != len(self.cfg.layers):
            hint = {
                "widths": "one width per layer (None where the layer has no MatFormer FFN)",
                "heads": "one fraction per layer (None where the layer has no nested heads)",
            }[name]
            raise ValueError(
                f"{name} has {len(widths)} entries but the model has {len(self.cfg.layers)} layers; "
                f"give {hint} or a single float"
            )
        return widths[layer]

    def new_caches(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> list:
        """Empty inference caches, one per layer (None for layers without a mixer)."""
        device = device or self.head_weight.device
        dtype = dtype or self.head_weight.dtype
        caches: list = [None] * len(self.cfg.layers)
        for key, block in self.layers.items():
            caches[int(key)] = block.new_cache(batch_size, max_seq_len, device, dtype)
        return caches

    def update_moe_bias(self) -> None:
        """Aux-loss-free balancing: move each MoE layer's expert bias towards even load."""
        for block in self.layers.values():
            if block.spec.ffn == "moe":
                block.ffn.update_bias()

    def fp32_param_names(self) -> set[str]:
        """Parameters that stay float32 whatever the compute dtype (SSM A_log, D, dt_bias)."""
        names = set()
        for mod_name, module in self.named_modules():
            for p_name in getattr(module, "fp32_params", ()):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        return names

    def no_weight_decay_names(self) -> set[str]:
        """Norm weights, biases and SSM parameters: the optimizer applies no decay to them."""
        names = set(self.fp32_param_names())
        for mod_name, module in self.named_modules():
            is_norm = "norm" in type(module).__name__.lower()
            for p_name, _ in module.named_parameters(recurse=False):
                if is_norm or p_name == "bias":
                    names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        return names

    def cast(self, dtype: torch.dtype) -> Decoder:
        """Cast parameters to `dtype`, keeping the SSM parameters in float32."""
        keep = self.fp32_param_names()
        for name, param in self.named_parameters():
            if name not in keep:
                param.data = param.data.to(dtype)
        return self
