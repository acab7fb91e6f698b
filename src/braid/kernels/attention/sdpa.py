"""Full causal attention through SDPA in the inputs' own dtype (cuDNN or flash on CUDA).

Legend: B batch, T time, H query heads, J key/value heads, D head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def causal_sdpa(q_BTHD: Tensor, k_BTJD: Tensor, v_BTJD: Tensor, *, scale: float | None = None) -> Tensor:
    """Plain causal attention (no window, documents or positions). o_BTHD in q's dtype."""
    q_BHTD, k_BJTD, v_BJTD = (t.transpose(1, 2) for t in (q_BTHD, k_BTJD, v_BTJD))
    o_BHTD = F.scaled_dot_product_attention(
        q_BHTD, k_BJTD, v_BJTD, is_causal=True, scale=scale, enable_gqa=q_BTHD.shape[2] != k_BTJD.shape[2]
    )
    return o_BHTD.transpose(1, 2)
