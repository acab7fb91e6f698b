"""Dropless MoE: dispatch vs a dense reference, hand-computed aux losses, bias balancing,
and the grouped SwiGLU kernel.

Legend: B batch, T time, D d_model, F expert hidden width, E experts, K top_k, N tokens.
Tolerances: float64 parity to rtol 1e-10 / atol 1e-12 (the same math summed in another order).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.moe import grouped_swiglu
from braid.model.config import MoEConfig
from braid.kernels.moe.reference import combine
from braid.model.moe import ARGMAX_TOP_K, MoE, dispatch, inverse_permutation, sort_by_expert, top_k_indices

D_MODEL = 8
TOL = dict(rtol=1e-10, atol=1e-12)


def _moe(seed: int = 0, **changes) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 6, **changes})
    torch.manual_seed(seed)
    moe = MoE(D_MODEL, cfg).double()
    moe.reset_parameters(std=0.5)  # large enough that routing is far from uniform
    return moe


def _expert(moe: MoE, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    return (F.silu(x_ND @ moe.w1[e]) * (x_ND @ moe.w3[e])) @ moe.w2[e]


def dense_reference(moe: MoE, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every expert on every token, masked and weighted by the routing; selection by rank, not topk."""
    cfg = moe.cfg
    x_ND = x_BTD.reshape(-1, D_MODEL)
    logits_NE = x_ND @ moe.router.weight.T
    scores_NE = logits_NE.softmax(-1) if cfg.score == "softmax" else logits_NE.sigmoid()
    selection_NE = scores_NE + (moe.expert_bias.double() if cfg.bias_balancing else 0.0)
    rank_NE = (selection_NE.unsqueeze(1) > selection_NE.unsqueeze(2)).sum(-1)  # experts scoring higher
    mask_NE = (rank_NE < cfg.top_k).double()
    gates_NE = scores_NE * mask_NE / (scores_NE * mask_NE).sum(-1, keepdim=True)
    y_ND = sum(gates_NE[:, e : e + 1] * _expert(moe, e, x_ND) for e in range(cfg.num_experts))
    if cfg.num_shared_experts:
        y_ND = y_ND + moe.shared(x_ND)
    probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
    fraction_E = mask_NE.mean(0) / cfg.top_k
    load_balance = cfg.num_experts * (fraction_E * probs_NE.mean(0)).sum()
    z_loss = torch.logsumexp(logits_NE, -1).pow(2).mean()
    return y_ND.reshape(x_BTD.shape), load_balance, z_loss


@pytest.mark.parametrize("bias_balancing", [False, True])
@pytest.mark.parametrize("num_shared_experts", [0, 2])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_dispatch_equals_dense_reference(score, num_shared_experts, bias_balancing):
    moe = _moe(score=score, num_shared_experts=num_shared_experts, bias_balancing=bias_balancing, d_shared=3)
    if bias_balancing:
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # the size of score gaps: changes selections
    x_BTD = torch.randn(2, 7, D_MODEL, dtype=torch.float64, requires_grad=True)
    params = [p for p in moe.parameters()]

    y_BTD, aux = moe(x_BTD)
    ref_BTD, ref_lb, ref_z = dense_reference(moe, x_BTD)
    torch.testing.assert_close(y_BTD, ref_BTD, **TOL)
    torch.testing.assert_close(aux["load_balance"], ref_lb, **TOL)
    torch.testing.assert_close(aux["z_loss"], ref_z, **TOL)

    grad_BTD = torch.randn_like(y_BTD)
    loss = (y_BTD * grad_BTD).sum() + aux["load_balance"] + aux["z_loss"]
    ref_loss = (ref_BTD * grad_BTD).sum() + ref_lb + ref_z
    grads = torch.autograd.grad(loss, [x_BTD, *params])
    ref_grads = torch.autograd.grad(ref_loss, [x_BTD, *params])
    for name, grad, ref_grad in zip(["x", *(n for n, _ in moe.named_parameters())], grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    assert grads[1].abs().sum() > 0  # the router learns through the gates and the aux losses


def test_dispatch_and_combine_are_gathers_with_exact_gradients():
    torch.manual_seed(0)
    num_tokens, top_k = 5, 3
    experts_NK = torch.randint(0, 4, (num_tokens, top_k))
    order_S = torch.argsort(experts_NK.flatten(), stable=True)
    unsort_S = torch.argsort(order_S)
    x_ND = torch.randn(num_tokens, 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(dispatch(x_ND, order_S, unsort_S, top_k), x_ND[order_S // top_k], rtol=0, atol=0)
    y_SD = torch.randn(num_tokens * top_k, 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(combine(y_SD, order_S, unsort_S), y_SD[unsort_S], rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: dispatch(x, order_S, unsort_S, top_k), (x_ND,))
    assert torch.autograd.gradcheck(lambda y: combine(y, order_S, unsort_S), (y_SD,))


@pytest.mark.parametrize("num_experts", [2, 8, 256, 257, 40000])
def test_sort_by_expert_is_the_stable_argsort(num_experts):
    """Narrow sort keys (uint8 up to 256 experts, then int16, int32) give int64's stable order."""
    expert_ids = torch.randint(num_experts, (4096,), generator=torch.Generator().manual_seed(num_experts))
    expert_ids[:2] = num_experts - 1  # the largest id fits the narrow key
    order = sort_by_expert(expert_ids, num_experts)
    assert torch.equal(order, torch.argsort(expert_ids, stable=True))
    inverse = inverse_permutation(order)
    assert torch.equal(inverse, torch.argsort(order))
    assert torch.equal(order[inverse], torch.arange(4096))


@pytest.mark.parametrize("k", [1, 2, ARGMAX_TOP_K, ARGMAX_TOP_K + 1])
def test_top_k_indices_are_topks_picks_in_order(k):
    selection_NE = torch.rand(500, 8, generator=torch.Generator().manual_seed(k))
    assert torch.equal(top_k_indices(selection_NE, k), selection_NE.topk(k, dim=-1).indices)
    assert top_k_indices(selection_NE, k).dtype == torch.int64


def test_top_k_indices_break_ties_by_column_and_never_repeat():
    selection_NE = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.2, 0.9, 0.2, 0.9]])
    assert top_k_indices(selection_NE, 3).tolist() == [[0, 1, 2], [1, 3, 0]]


def test_top_k_indices_under_compile_match_eager():
    selection_NE = torch.rand(64, 8, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(top_k_indices, fullgraph=True)
    assert torch.equal(compiled(selection_NE, 2), top_k_indices(selection_NE, 2))


def test_bias_changes_selection_in_parity_test():
    moe = _moe(bias_balancing=True)
    x_ND = torch.randn(14, D_MODEL, dtype=torch.float64)
    before_NK = moe.route(x_ND)[2]
    moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    assert not torch.equal(before_NK.sort(-1).values, moe.route(x_ND)[2].sort(-1).values)


def test_routing_is_float32_under_autocast():
    """bf16 autocast must not reach the router: logits, scores and gates stay float32, and the
    selection is the one float32 gives for the same (bf16-rounded) input."""
    moe = _moe()
    x_ND = torch.randn(64, moe.router.in_features).to(torch.bfloat16).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = moe.route(x_ND)
    plain = moe.route(x_ND)
    assert all(t.dtype == torch.float32 for t in (routed[0], routed[1], routed[3]))
    for got, want in zip(routed, plain):
        assert torch.equal(got, want)


def test_output_keeps_input_dtype():
    moe = MoE(D_MODEL, MoEConfig(num_experts=4, top_k=2, d_expert=6, num_shared_experts=1)).bfloat16()
    y_BTD, aux = moe(torch.randn(2, 3, D_MODEL, dtype=torch.bfloat16))
    assert y_BTD.dtype == torch.bfloat16 and y_BTD.shape == (2, 3, D_MODEL)
    assert aux["z_loss"].dtype == torch.float32 and aux["load_balance"].dtype == torch.float32


def _hand_router(score: str, top_k: int) -> MoE:
    moe = MoE(4, MoEConfig(num_experts=4, top_k=top_k, d_expert=2, score=score)).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))  # logits = x
    return moe


# logits = log(p) + c, so softmax = p and logsumexp = c.
SOFTMAX_P = torch.tensor(
    [[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2]], dtype=torch.float64
)
SOFTMAX_C = torch.tensor([1.0, 2.0, -1.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "top_k, expected_lb",
    [
        # P = column means of SOFTMAX_P = [1.1, 1.35, 0.725, 0.825] / 4 = [0.275, 0.3375, 0.18125, 0.20625].
        # k=1 picks experts 0, 3, 0, 1: f = [2, 1, 0, 1] / 4 -> 4 * (0.1375 + 0.084375 + 0.0515625) = 1.09375.
        (1, 1.09375),
        # k=2 picks {0,1}, {3,2}, {0,1}, {1,3}: f = [2, 3, 1, 2] / 8
        # -> 4 * (0.06875 + 0.1265625 + 0.02265625 + 0.0515625) = 1.078125.
        (2, 1.078125),
    ],
)
def test_aux_losses_hand_computed_softmax(top_k, expected_lb):
    moe = _hand_router("softmax", top_k)
    x_BTD = (SOFTMAX_P.log() + SOFTMAX_C[:, None]).unsqueeze(0)
    _, aux = moe(x_BTD)
    # z_loss = mean(c^2) = (1 + 4 + 1 + 0) / 4 = 1.5.
    torch.testing.assert_close(aux["z_loss"].item(), 1.5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux["load_balance"].item(), expected_lb, rtol=1e-12, atol=1e-12)


def test_aux_losses_hand_computed_sigmoid():
    moe = _hand_router("sigmoid", top_k=1)
    # sigmoid scores s, logits = log(s / (1 - s)):
    # token 0: s = [0.5, 0.8, 0.2, 0.25], sum 1.75 -> picks expert 1; normalised s[1] = 0.8/1.75, s[2] = 0.2/1.75.
    # token 1: s = [0.75, 0.25, 0.9, 0.5], sum 2.4 -> picks expert 2; normalised s[1] = 0.25/2.4, s[2] = 0.9/2.4.
    # f = [0, 0.5, 0.5, 0]: load_balance = 4 * 0.5 * (P_1 + P_2) = (0.8 + 0.2)/1.75 + (0.25 + 0.9)/2.4.
    s_NE = torch.tensor([[0.5, 0.8, 0.2, 0.25], [0.75, 0.25, 0.9, 0.5]], dtype=torch.float64)
    _, aux = moe(torch.logit(s_NE).unsqueeze(0))
    expected_lb = 1.0 / 1.75 + 1.15 / 2.4
    # logsumexp(log(s/(1-s))) = log(sum s/(1-s)): token 0: log(1 + 4 + 1/4 + 1/3) = log(67/12);
    # token 1: log(3 + 1/3 + 9 + 1) = log(40/3).
    expected_z = (math.log(67 / 12) ** 2 + math.log(40 / 3) ** 2) / 2
    torch.testing.assert_close(aux["load_balance"].item(), expected_lb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux["z_loss"].item(), expected_z, rtol=1e-12, atol=1e-12)


def test_gates_renormalised_over_top_k():
    moe = _hand_router("softmax", top_k=2)
    x_ND = SOFTMAX_P.log() + SOFTMAX_C[:, None]
    _, _, experts_NK, gates_NK = moe.route(x_ND)
    assert experts_NK.tolist() == [[0, 1], [3, 2], [0, 1], [1, 3]]
    torch.testing.assert_close(gates_NK[0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gates_NK[1], torch.tensor([4 / 7, 3 / 7], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def _overloaded_moe() -> tuple[MoE, torch.Tensor]:
    """Every token scores expert 0 highest, expert 1 second (sigmoid scores)."""
    moe = _hand_router("sigmoid", top_k=1)
    moe.cfg.bias_balancing = True
    x_BTD = torch.tensor([[[2.0, 1.0, -1.0, -2.0], [1.5, 1.0, -0.5, -1.0], [3.0, 0.5, 0.0, -3.0]]], dtype=torch.float64)
    return moe, x_BTD


def test_bias_update_lowers_overloaded_and_raises_underloaded():
    moe, x_BTD = _overloaded_moe()
    moe.train()
    moe(x_BTD)
    moe(x_BTD)
    assert moe.tokens_per_expert.tolist() == [6.0, 0.0, 0.0, 0.0]
    moe.update_bias()
    rate = moe.cfg.bias_update_rate
    assert moe.expert_bias.tolist() == pytest.approx([-rate, rate, rate, rate])
    assert moe.tokens_per_expert.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_counts_only_accumulate_in_training():
    moe, x_BTD = _overloaded_moe()
    moe.eval()
    moe(x_BTD)
    assert moe.tokens_per_expert.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_update_bias_is_noop_without_bias_balancing():
    moe, x_BTD = _overloaded_moe()
    moe.cfg.bias_balancing = False
    moe.train()
    moe(x_BTD)
    moe.update_bias()
    assert moe.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_bias_changes_selection_not_gate_weights():
    moe, x_BTD = _overloaded_moe()
    moe.cfg.top_k = 2
    x_ND = x_BTD[0]
    scores_NE = x_ND.sigmoid()
    experts_NK, gates_NK = moe.route(x_ND)[2:]
    assert experts_NK.tolist() == [[0, 1]] * 3
    moe.expert_bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 1.0]))  # pushes expert 3 in and expert 0 out
    experts_NK, gates_NK = moe.route(x_ND)[2:]
    assert experts_NK.tolist() == [[3, 1]] * 3
    picked_NK = scores_NE[:, [3, 1]]
    torch.testing.assert_close(gates_NK, picked_NK / picked_NK.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_when_every_token_picks_one_expert(top_k):
    moe = _moe(top_k=top_k, score="softmax")
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 100.0  # logit of expert 2 = 100 * x[0], x[0] = 1 below
        moe.router.weight[1, 0] = 50.0
    x_BTD = torch.randn(3, 5, D_MODEL, dtype=torch.float64)
    x_BTD[..., 0] = 1.0
    moe.train()
    y_BTD, _ = moe(x_BTD)
    x_ND = x_BTD.reshape(-1, D_MODEL)
    num_tokens = x_ND.shape[0]
    if top_k == 1:
        expected_ND = _expert(moe, 2, x_ND)
        assert moe.tokens_per_expert.tolist() == [0.0, 0.0, num_tokens, 0.0]
    else:
        expected_ND = dense_reference(moe, x_BTD)[0].reshape(-1, D_MODEL)
        assert moe.tokens_per_expert.tolist() == [0.0, num_tokens, num_tokens, 0.0]
    torch.testing.assert_close(y_BTD.reshape(-1, D_MODEL), expected_ND, **TOL)
    assert torch.all(y_BTD.abs().sum(-1) > 0)


def test_moe_parameters_and_buffers():
    moe = MoE(D_MODEL, MoEConfig(num_experts=4, top_k=2, d_expert=6, num_shared_experts=2, d_shared=3))
    shapes = {name: tuple(p.shape) for name, p in moe.named_parameters()}
    assert shapes == {
        "router.weight": (4, D_MODEL),
        "w1": (4, D_MODEL, 6),
        "w3": (4, D_MODEL, 6),
        "w2": (4, 6, D_MODEL),
        "shared.w1.weight": (6, D_MODEL),
        "shared.w3.weight": (6, D_MODEL),
        "shared.w2.weight": (D_MODEL, 6),
    }
    assert {name: b.dtype for name, b in moe.named_buffers()} == {
        "expert_bias": torch.float32,
        "tokens_per_expert": torch.float32,
    }
    assert not hasattr(MoE(D_MODEL, MoEConfig(num_experts=4, d_expert=6)), "shared")


def test_builds_on_meta_and_resets():
    with torch.device("meta"):
        moe = MoE(D_MODEL, MoEConfig(num_experts=4, top_k=2, d_expert=6))
    moe.to_empty(device="cpu")
    moe.expert_bias.fill_(1.0)
    moe.reset_parameters()
    assert moe.expert_bias.tolist() == [0.0] * 4 and moe.tokens_per_expert.tolist() == [0.0] * 4
    assert 0.0 < moe.w1.std().item() < 0.04


def test_moe_rejects_wrong_d_model():
    with pytest.raises(ValueError, match="d_model=8"):
        MoE(D_MODEL, MoEConfig(num_experts=4, d_expert=6))(torch.randn(1, 2, 5))


def test_grouped_swiglu_matches_per_row_loop():
    gen = torch.Generator().manual_seed(0)
    w1_EDF, w3_EDF = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).unbind(0)
    w2_EFD = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    counts_E = torch.tensor([3, 0, 4])  # an expert with no rows
    x_ND = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    experts_N = torch.repeat_interleave(torch.arange(3), counts_E)
    expected_ND = torch.stack(
        [(F.silu(x_ND[n] @ w1_EDF[e]) * (x_ND[n] @ w3_EDF[e])) @ w2_EFD[e] for n, e in enumerate(experts_N.tolist())]
    )
    torch.testing.assert_close(grouped_swiglu(x_ND, counts_E, w1_EDF, w3_EDF, w2_EFD), expected_ND, **TOL)


def test_grouped_swiglu_rejects_bad_inputs():
    w1_EDF = torch.zeros(3, 4, 5)
    w2_EFD = torch.zeros(3, 5, 4)
    x_ND = torch.zeros(7, 4)
    with pytest.raises(ValueError, match="sum to the 7 rows"):
        grouped_swiglu(x_ND, torch.tensor([3, 0, 3]), w1_EDF, w1_EDF, w2_EFD)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        grouped_swiglu(x_ND, torch.tensor([3.0, 0.0, 4.0]), w1_EDF, w1_EDF, w2_EFD)
    with pytest.raises(ValueError, match=r"expected \(E, F, D\)"):
        grouped_swiglu(x_ND, torch.tensor([3, 0, 4]), w1_EDF, w1_EDF, w2_EFD.transpose(1, 2))
    with pytest.raises(ValueError, match="d_model 5"):
        grouped_swiglu(torch.zeros(7, 5), torch.tensor([3, 0, 4]), w1_EDF, w1_EDF, w2_EFD)
