"""Sliding-window and document-masked causal attention with FlexAttention block masks.

The BlockMask (which key blocks each query block visits) is built once per (length, window)
and, with documents, once per doc ids tensor (every layer of a forward pass shares it);
flex_attention is compiled once, here, and recompiles only for new shapes.

Legend: B batch, T time, H query heads, J key/value heads, D head dim.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

compiled_flex_attention = torch.compile(flex_attention, dynamic=False)

# Triton kernel options passed to flex_attention (None: its defaults), e.g.
# {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}; bench/kernels.py compares choices.
KERNEL_OPTIONS: dict | None = None


def causal_mask_mod(window: int | None):
    """mask_mod: key k visible from query q iff k <= q (and q - k < window)."""
    if window is None:
        return lambda b, h, q, k: q >= k
    return lambda b, h, q, k: (q >= k) & (q - k < window)


def document_mask_mod(doc_ids_BT: Tensor, window: int | None):
    """causal_mask_mod restricted to keys of the query's document (row b of doc_ids_BT)."""
    causal = causal_mask_mod(window)
    return lambda b, h, q, k: causal(b, h, q, k) & (doc_ids_BT[b, q] == doc_ids_BT[b, k])


def create_causal_block_mask(T: int, window: int | None, doc_ids_BT: Tensor | None, device) -> BlockMask:
    """A new BlockMask for causal attention over T tokens (window and documents optional)."""
    if doc_ids_BT is None:
        return create_block_mask(causal_mask_mod(window), None, None, T, T, device=device)
    return create_block_mask(document_mask_mod(doc_ids_BT, window), doc_ids_BT.shape[0], None, T, T, device=device)


class _MaskCache:
    """Masks without documents by (T, window, device); document masks for the last doc ids tensor."""

    def __init__(self):
        self.plain: dict[tuple, BlockMask] = {}
        self.doc_ref = None
        self.doc_version = -1
        self.doc_masks: dict[tuple, BlockMask] = {}

    def get(self, T: int, window: int | None, doc_ids_BT: Tensor | None, device: torch.device) -> BlockMask:
        if doc_ids_BT is None:
            key = (T, window, str(device))
            if key not in self.plain:
                self.plain[key] = create_causal_block_mask(T, window, None, device)
            return self.plain[key]
        if self.doc_ref is None or self.doc_ref() is not doc_ids_BT or self.doc_version != doc_ids_BT._version:
            self.doc_ref, self.doc_version, self.doc_masks = weakref.ref(doc_ids_BT), doc_ids_BT._version, {}
        key = (T, window)
        if key not in self.doc_masks:
            self.doc_masks[key] = create_causal_block_mask(T, window, doc_ids_BT, device)
        return self.doc_masks[key]


_masks = _MaskCache()


@torch.compiler.disable
def block_mask(T: int, window: int | None, doc_ids_BT: Tensor | None, device: torch.device) -> BlockMask:
    """The cached BlockMask for causal attention over T tokens (window None = full)."""
    return _masks.get(T, window, doc_ids_BT, device)


def attention_flex(
    q_BTHD: Tensor,
    k_BTJD: Tensor,
    v_BTJD: Tensor,
    *,
    window: int | None = None,
    doc_ids_BT: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal attention (window and documents optional) with compiled flex_attention. o_BTHD."""
    T = q_BTHD.shape[1]
    window = None if window is not None and window >= T else window
    mask = block_mask(T, window, doc_ids_BT, q_BTHD.device)
    q_BHTD, k_BJTD, v_BJTD = (t.transpose(1, 2) for t in (q_BTHD, k_BTJD, v_BTJD))
    o_BHTD = compiled_flex_attention(
        q_BHTD, k_BJTD, v_BJTD, block_mask=mask, scale=scale, enable_gqa=q_BTHD.shape[2] != k_BTJD.shape[2],
        kernel_options=KERNEL_OPTIONS,
    )
    return o_BHTD.transpose(1, 2)
