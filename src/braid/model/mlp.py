"""Dense SwiGLU FFN (weights initialised in braid.model.init or by reset_parameters).

Legend: B batch, T time, D d_model, F hidden width (d_ff).
"""

import torch
from torch import nn

from braid.kernels.swiglu import silu_mul


class SwiGLU(nn.Module):
    """y = w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        if d_model <= 0 or d_ff <= 0:
            raise ValueError(f"SwiGLU needs positive d_model and d_ff, got d_model={d_model}, d_ff={d_ff}")
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for linear in (self.w1, self.w3, self.w2):
            nn.init.normal_(linear.weight, mean=0.0, std=std)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """x_BTD: (B, T, D) (any leading dims) -> (B, T, D)."""
        d_model = self.w1.in_features
        if x_BTD.shape[-1] != d_model:
            raise ValueError(f"SwiGLU: input last dim {x_BTD.shape[-1]} does not match d_model={d_model}")
        return self.w2(silu_mul(self.w1(x_BTD), self.w3(x_BTD)))
