"""The update x -> decay * x + term of a linear recurrence, composed for tl.associative_scan:
braid's passes over the chunks (braid.kernels.gla.scan_triton, braid.kernels.ssd.pass_triton)
scan a few chunks' updates at a time in registers with it."""

from __future__ import annotations

import triton


@triton.jit
def compose(decay_1, term_1, decay_2, term_2):
    """Two updates x -> decay * x + term, the first then the second, as one."""
    return decay_1 * decay_2, decay_2 * term_1 + term_2
