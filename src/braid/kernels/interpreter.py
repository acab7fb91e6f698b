"""Whether braid's Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1: the CPU
parity tests).

The interpreter's bf16 dots came out wrong (Triton 3.8, 2026-11-29: errors of 1e10 on a 16 x 16
product), so kernels that dot bf16 tiles on the GPU take a constexpr flag from `interpreted()`
and convert those tiles to float32 there: bf16 values are exact in float32, and the GPU's bf16
dots sum in float32 too.
"""

from __future__ import annotations

import os


def interpreted() -> bool:
    """True under Triton's interpreter (read when a kernel is launched)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
