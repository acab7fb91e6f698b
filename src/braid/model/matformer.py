"""MatFormer nested SwiGLU FFN: width w uses the first m = cfg.hidden(w) hidden units.

The width is a forward argument, never module state, so one universal model serves every
width (training samples widths per step; Mix'n'Match picks one per layer). A prefix of
hidden units is a prefix of the rows of w1 and w3 and of the columns of w2.

Legend: B batch, T time, D d_model, F full hidden width (cfg.d_ff), M prefix width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from braid.kernels.swiglu import silu_mul
from braid.model.config import MatFormerConfig
from braid.model.mlp import SwiGLU


class MatFormerFFN(nn.Module):
    """SwiGLU with parameters w1, w3 (F, D) and w2 (D, F), usable at any granularity's prefix."""

    def __init__(self, d_model: int, cfg: MatFormerConfig):
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        self.w1 = nn.Linear(d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for linear in (self.w1, self.w3, self.w2):
            nn.init.normal_(linear.weight, mean=0.0, std=std)

    def forward(self, x_BTD: torch.Tensor, width: float | None = None) -> torch.Tensor:
        """x_BTD: (B, T, D) (any leading dims) -> (B, T, D) through the first cfg.hidden(width) units.

        width: one of cfg.granularities; None means the full width 1.0.
        """
        d_model = self.w1.in_features
        if x_BTD.shape[-1] != d_model:
            raise ValueError(f"MatFormerFFN: input last dim {x_BTD.shape[-1]} does not match d_model={d_model}")
        w1_MD, w3_MD, w2_DM = self._prefix(width)
        return F.linear(silu_mul(F.linear(x_BTD, w1_MD), F.linear(x_BTD, w3_MD)), w2_DM)

    def sliced_state_dict(self, width: float) -> dict[str, torch.Tensor]:
        """A SwiGLU state dict (copied weights) of hidden width cfg.hidden(width)."""
        w1_MD, w3_MD, w2_DM = self._prefix(width)
        return {
            "w1.weight": w1_MD.detach().clone(),
            "w3.weight": w3_MD.detach().clone(),
            "w2.weight": w2_DM.detach().clone(),
        }

    def extra_repr(self) -> str:
        return f"d_ff={self.cfg.d_ff}, granularities={tuple(self.cfg.granularities)}"

    def _prefix(self, width: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_hidden = self.cfg.hidden(1.0 if width is None else width)  # raises on a width not in granularities
        # Under tensor parallelism w1 holds d_ff / tp units, each rank its share of every
        # nested band (braid.parallel.tp), so the local prefix is hidden(width) / tp.
        num_hidden = num_hidden * self.w1.weight.shape[0] // self.cfg.d_ff
        return self.w1.weight[:num_hidden], self.w3.weight[:num_hidden], self.w2.weight[:, :num_hidden]


def slice_matformer(module: MatFormerFFN, width: float) -> SwiGLU:
    """A standalone SwiGLU of hidden width cfg.hidden(width) holding copies of the prefix weights."""
    state = module.sliced_state_dict(width)
    d_ff, d_model = state["w1.weight"].shape
    weight = module.w1.weight
    with torch.device(weight.device):
        sliced = SwiGLU(d_model, d_ff).to(weight.dtype)
    sliced.load_state_dict(state)
    return sliced
