"""Dropless top-k mixture of SwiGLU experts, with optional shared experts.

Routing: router logits in float32; scores = softmax or sigmoid(logits); the top-k experts
are selected on scores (+ expert_bias when cfg.bias_balancing); gate weights are the
selected scores renormalised to sum to 1 over the k. Renormalising follows Mixtral for
softmax and DeepSeek-V3 for sigmoid; with top_k=1 it makes every gate 1, so the router then
learns only through the auxiliary losses. The bias steers selection only, never the gates.

Dispatch is dropless (no capacity factor): the N*K (token, expert) assignments are sorted by
expert, each expert runs on its contiguous slice through braid.kernels.moe.grouped_swiglu,
and the outputs are unsorted, weighted by their gates and summed over the k.

Legend: B batch, T time, D d_model, F expert hidden width (d_expert), E experts, K top_k,
N tokens (B*T), S routed slots (N*K).
"""

import torch
import torch.nn.functional as F
from torch import nn

from braid.kernels.moe import grouped_swiglu
from braid.model.config import MoEConfig
from braid.model.mlp import SwiGLU


class MoE(nn.Module):
    """Router (E, D), experts w1, w3 (E, D, F) and w2 (E, F, D), optional `shared` SwiGLU.

    Buffers: expert_bias (E,) float32, the aux-loss-free balancing bias; tokens_per_expert
    (E,) float32, routed-token counts accumulated in training since the last update_bias().
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        num_experts, d_expert = cfg.num_experts, cfg.d_expert
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        if cfg.num_shared_experts > 0:
            d_shared = cfg.d_shared if cfg.d_shared is not None else d_expert
            self.shared = SwiGLU(d_model, d_shared * cfg.num_shared_experts)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for weight in (self.router.weight, self.w1, self.w3, self.w2):
            nn.init.normal_(weight, mean=0.0, std=std)
        if hasattr(self, "shared"):
            self.shared.reset_parameters(std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_BTD: (B, T, D) (any leading dims) -> (y_BTD, aux).

        aux holds unweighted scalar losses with gradients: "load_balance" (E * sum_e f_e P_e)
        and "z_loss" (mean over tokens of logsumexp(logits)^2).
        """
        d_model = self.router.in_features
        if x_BTD.shape[-1] != d_model:
            raise ValueError(f"MoE: input last dim {x_BTD.shape[-1]} does not match d_model={d_model}")
        x_ND = x_BTD.reshape(-1, d_model)
        logits_NE, scores_NE, experts_NK, gates_NK = self.route(x_ND)
        counts_E = torch.bincount(experts_NK.flatten(), minlength=self.cfg.num_experts)
        y_ND = self._experts(x_ND, experts_NK, gates_NK, counts_E)
        if hasattr(self, "shared"):
            y_ND = y_ND + self.shared(x_ND)
        if self.training:
            self.tokens_per_expert.add_(counts_E.detach().float())
        aux = {
            "load_balance": self._load_balance_loss(scores_NE, counts_E),
            "z_loss": torch.logsumexp(logits_NE, dim=-1).square().mean(),
        }
        return y_ND.reshape(x_BTD.shape), aux

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_ND: (N, D) -> logits_NE, scores_NE (float32, float64 for float64 x), experts_NK, gates_NK."""
        router_dtype = torch.promote_types(x_ND.dtype, torch.float32)
        logits_NE = F.linear(x_ND.to(router_dtype), self.router.weight.to(router_dtype))
        if self.cfg.score == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
        selection_NE = scores_NE.detach()
        if self.cfg.bias_balancing:
            selection_NE = selection_NE + self.expert_bias.to(router_dtype)
        experts_NK = selection_NE.topk(self.cfg.top_k, dim=-1).indices
        gates_NK = scores_NE.gather(-1, experts_NK)
        gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)
        return logits_NE, scores_NE, experts_NK, gates_NK

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of underloaded experts, lower
        that of overloaded ones by cfg.bias_update_rate, then reset the counts. No-op unless
        cfg.bias_balancing. Under data parallelism, all-reduce tokens_per_expert first."""
        if not self.cfg.bias_balancing:
            return
        counts_E = self.tokens_per_expert
        self.expert_bias.add_(self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E))
        counts_E.zero_()

    def _experts(
        self, x_ND: torch.Tensor, experts_NK: torch.Tensor, gates_NK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = experts_NK.shape
        order_S = torch.argsort(experts_NK.flatten(), stable=True)
        y_sorted_SD = grouped_swiglu(x_ND[order_S // top_k], counts_E, self.w1, self.w3, self.w2)
        unsort_S = torch.empty_like(order_S)
        unsort_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_NKD = y_sorted_SD[unsort_S].reshape(num_tokens, top_k, -1)
        y_ND = (y_NKD.to(gates_NK.dtype) * gates_NK.unsqueeze(-1)).sum(dim=1)
        return y_ND.to(x_ND.dtype)

    def _load_balance_loss(self, scores_NE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # P_e needs a distribution over experts per token: sigmoid scores are normalised to
        # sum to 1 first, as in DeepSeek-V3's sequence-wise balance loss.
        probs_NE = scores_NE if self.cfg.score == "softmax" else scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        fraction_E = counts_E.to(probs_NE.dtype) / counts_E.sum()
        return self.cfg.num_experts * (fraction_E * probs_NE.mean(dim=0)).sum()

    def extra_repr(self) -> str:
        cfg = self.cfg
        return (
            f"num_experts={cfg.num_experts}, top_k={cfg.top_k}, d_expert={cfg.d_expert}, "
            f"score={cfg.score}, bias_balancing={cfg.bias_balancing}"
        )
