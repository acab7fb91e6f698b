"""Dropless top-k mixture of SwiGLU experts, with optional shared experts.

Routing: router logits in float32; scores = softmax or sigmoid(logits); the top-k experts
are selected on scores (+ expert_bias when cfg.bias_balancing); gate weights are the
selected scores renormalised to sum to 1 over the k. Renormalising follows Mixtral for
softmax and DeepSeek-V3 for sigmoid; with top_k=1 it makes every gate 1, so the router then
learns only through the auxiliary losses. The bias steers selection only, never the gates.

Dispatch is dropless (no capacity factor): the N*K (token, expert) assignments are sorted by
expert, each expert runs on its contiguous slice through braid.kernels.moe.grouped_swiglu,
and the outputs are unsorted, weighted by their gates and summed over the k. Sorting and
unsorting are gathers forward and backward (`dispatch` here, `braid.kernels.moe.weighted_combine`
for the unsort with the gate weighting): no scatter-adds, so the backward is deterministic.

Two methods are the seams for parallelism (braid.parallel.ep swaps in a subclass):
`run_experts` (expert parallelism replaces it by an all-to-all) and `batch_sum` (the aux
losses are built from per-token sums that it adds over data-parallel ranks, so they are the
losses of the global batch).

Legend: B batch, T time, D d_model, F expert hidden width (d_expert), E experts, K top_k,
N tokens (B*T), S routed slots (N*K), X packed statistics (2E + 2).
"""

import torch
from torch import nn

from braid.kernels.moe import expert_input_dtype, grouped_swiglu, router_logits, weighted_combine
from braid.model.config import MoEConfig
from braid.model.mlp import SwiGLU


def expert_counts(experts_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows routed to each expert, (E,) int64. A scatter-add, not torch.bincount, which on
    CUDA reads the largest index back to the host (a sync per MoE layer, and no CUDA graph)."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=experts_NK.device)
    flat = experts_NK.flatten()
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat))


KEY_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stable order that sorts the flat expert_ids by expert, (S,) int64.

    The keys are cast to the narrowest integer type that holds num_experts - 1 first: CUDA's
    radix sort makes one pass per key byte, so uint8 keys take one pass where int64 takes eight."""
    key_dtype = next(d for d in KEY_DTYPES if num_experts - 1 <= torch.iinfo(d).max)
    return torch.argsort(expert_ids.to(key_dtype), stable=True)


# Up to this many picks, top_k_indices takes repeated argmaxes (fused with the routing's
# element-wise work under torch.compile); beyond it, torch.topk.
ARGMAX_TOP_K = 4


def top_k_indices(selection_NE: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries' columns per row, largest first, (N, K) int64.

    For small k, k rounds of argmax, each masking its pick: elementwise work that inductor
    fuses into the softmax's kernel, where torch.topk on CUDA is a radix select plus a sort
    (0.042 ms of a 2.21 ms hybrid-374m MoE layer at B2 T8192 on an H200; argmax took the
    layer to 2.15 ms). The picks are topk's, except that of equal scores the first column
    wins here where topk's choice is unspecified."""
    if k > ARGMAX_TOP_K or k >= selection_NE.shape[-1]:
        return selection_NE.topk(k, dim=-1).indices
    columns_E = torch.arange(selection_NE.shape[-1], device=selection_NE.device)
    picks, remaining_NE = [], selection_NE
    for _ in range(k):
        pick_N1 = remaining_NE.argmax(dim=-1, keepdim=True)
        picks.append(pick_N1)
        remaining_NE = torch.where(columns_E == pick_N1, float("-inf"), remaining_NE)
    return torch.cat(picks, dim=-1)


def inverse_permutation(order_S: torch.Tensor) -> torch.Tensor:
    """inverse[order_S[i]] = i: the position of each element in the order (a scatter of
    distinct indices, deterministic, where an argsort of the order would be another sort)."""
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return inverse_S


class _Dispatch(torch.autograd.Function):
    """x_ND's rows for the slots sorted by expert, x_ND[order_S // K]; the backward gathers
    each token's K slot gradients through the inverse order and sums them (no atomics)."""

    @staticmethod
    def forward(ctx, x_ND, order_S, unsort_S, top_k: int):
        ctx.save_for_backward(unsort_S)
        ctx.top_k = top_k
        return x_ND[order_S // top_k]

    @staticmethod
    def backward(ctx, grad_SD):
        (unsort_S,) = ctx.saved_tensors
        grad_NKD = grad_SD[unsort_S].unflatten(0, (-1, ctx.top_k))
        sum_dtype = torch.promote_types(grad_SD.dtype, torch.float32)
        return grad_NKD.sum(dim=1, dtype=sum_dtype).to(grad_SD.dtype), None, None, None


def dispatch(x_ND: torch.Tensor, order_S: torch.Tensor, unsort_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token rows for the N*K routed slots in expert order: x_ND[order_S // top_k] (S, D).

    order_S sorts the flattened (token, k) slots by expert and unsort_S is its inverse. Both
    directions are gathers: the backward reads each token's K slot gradients at unsort_S and
    sums them, instead of the scatter-add (atomics, nondeterministic) of plain indexing."""
    return _Dispatch.apply(x_ND, order_S, unsort_S, top_k)


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
        # Where the experts' GEMMs read bf16, the tokens are cast once, here: the router, the row
        # gathers and their gradients then move bf16 rows, not float32 ones.
        x_ND = x_BTD.reshape(-1, d_model).to(expert_input_dtype(x_BTD, self.w1))
        logits_NE, scores_NE, experts_NK, gates_NK = self.route(x_ND)
        counts_E = expert_counts(experts_NK, self.cfg.num_experts)
        y_ND = self._experts(x_ND, experts_NK, gates_NK, counts_E).to(x_BTD.dtype)
        if hasattr(self, "shared"):
            y_ND = y_ND + self.shared(x_ND)
        if self.training:
            self.tokens_per_expert.add_(counts_E.detach().float())
        return y_ND.reshape(x_BTD.shape), self._aux_losses(logits_NE, scores_NE, counts_E)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_ND: (N, D) -> logits_NE, scores_NE (float32, float64 for float64 x), experts_NK, gates_NK."""
        logits_NE = router_logits(x_ND, self.router.weight)
        router_dtype = logits_NE.dtype
        if self.cfg.score == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
        selection_NE = scores_NE.detach()
        if self.cfg.bias_balancing:
            selection_NE = selection_NE + self.expert_bias.to(router_dtype)
        experts_NK = top_k_indices(selection_NE, self.cfg.top_k)
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
        top_k = experts_NK.shape[1]
        order_S = sort_by_expert(experts_NK.flatten(), self.cfg.num_experts)
        unsort_S = inverse_permutation(order_S)
        y_sorted_SD = self.run_experts(dispatch(x_ND, order_S, unsort_S, top_k), counts_E)
        return weighted_combine(y_sorted_SD, gates_NK, order_S, unsort_S)

    def run_experts(self, x_sorted_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_sorted_SD: (S, D) rows sorted by expert, counts_E: (E,) -> (S, D) expert outputs.

        The one place the experts run: expert parallelism overrides it with an all-to-all.
        """
        return grouped_swiglu(x_sorted_SD, counts_E, self.w1, self.w3, self.w2)

    def batch_sum(self, sums_X: torch.Tensor) -> torch.Tensor:
        """Per-token statistics summed over this module's tokens -> summed over the whole batch.

        Identity on one device; data and expert parallelism override it with an all-reduce
        over the ranks that split the batch, so the aux losses are those of the global batch.
        """
        return sums_X

    def _aux_losses(
        self, logits_NE: torch.Tensor, scores_NE: torch.Tensor, counts_E: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # P_e needs a distribution over experts per token: sigmoid scores are normalised to
        # sum to 1 first, as in DeepSeek-V3's sequence-wise balance loss.
        probs_NE = scores_NE if self.cfg.score == "softmax" else scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        num_experts = self.cfg.num_experts
        # Sums, not means, so that batch_sum can add them over ranks before dividing.
        sums_X = torch.cat(
            [
                counts_E.to(probs_NE.dtype),
                probs_NE.sum(dim=0),
                torch.logsumexp(logits_NE, dim=-1).square().sum().reshape(1),
                probs_NE.new_full((1,), probs_NE.shape[0]),
            ]
        )
        counts_E, probs_sum_E, z_sum, num_tokens = self.batch_sum(sums_X).split([num_experts, num_experts, 1, 1])
        fraction_E = counts_E / counts_E.sum()
        load_balance = num_experts * (fraction_E * probs_sum_E / num_tokens).sum()
        return {"load_balance": load_balance, "z_loss": (z_sum / num_tokens).squeeze(0)}

    def extra_repr(self) -> str:
        cfg = self.cfg
        return (
            f"num_experts={cfg.num_experts}, top_k={cfg.top_k}, d_expert={cfg.d_expert}, "
            f"score={cfg.score}, bias_balancing={cfg.bias_balancing}"
        )
