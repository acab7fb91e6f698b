"""Parity tests for braid.kernels.attention: the public op (SDPA on CPU) and the explicit-softmax
reference against an oracle whose mask is written element by element from the documented rule;
plus causality, packing, windows, GQA and the KV-cache positions path.

Legend: B batch, T queries, S keys, H query heads, J key/value heads, D head dim.
Tolerances: float64 atol 1e-12 / rtol 1e-10 (differences are summation order only);
float32 atol 2e-6; bfloat16 output vs float64 atol 2e-2 (one bf16 rounding of inputs and output).
"""

import pytest
import torch

from braid.kernels.attention import attention, attention_reference

F64 = dict(atol=1e-12, rtol=1e-10)
# (window, number of documents): plain causal, sliding window, packed docs, both.
MASK_CASES = [(None, 1), (5, 1), (None, 3), (4, 3)]


def _qkv(B, T, H, J, D, dtype=torch.float64, seed=0, S=None):
    gen = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    k = torch.randn(B, S, J, D, generator=gen, dtype=dtype)
    v = torch.randn(B, S, J, D, generator=gen, dtype=dtype)
    return q, k, v


def _doc_ids(B, T, num_docs, seed=0):
    """Contiguous runs: num_docs - 1 random cut points per row (rows differ)."""
    if num_docs == 1:
        return None
    gen = torch.Generator().manual_seed(seed)
    doc_ids = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        cuts = torch.randperm(max(T - 1, 1), generator=gen)[: num_docs - 1] + 1
        for cut in cuts.tolist():
            doc_ids[b, cut:] += 1
    return doc_ids


def _visible_by_rule(B, T, S, window=None, doc_ids=None, q_pos=None, k_pos=None, k_doc=None):
    """mask_BTS written element by element from the documented visibility rule."""
    q_pos = [list(range(T))] * B if q_pos is None else q_pos.tolist()
    k_pos = [list(range(S))] * B if k_pos is None else k_pos.tolist()
    q_doc = [[0] * T] * B if doc_ids is None else doc_ids.tolist()
    k_doc = [[0] * S] * B if doc_ids is None else (q_doc if k_doc is None else k_doc.tolist())
    visible = [
        [
            [
                0 <= k_pos[b][s] <= q_pos[b][t]
                and (window is None or q_pos[b][t] - k_pos[b][s] < window)
                and k_doc[b][s] == q_doc[b][t]
                for s in range(S)
            ]
            for t in range(T)
        ]
        for b in range(B)
    ]
    return torch.tensor(visible, dtype=torch.bool).view(B, T, S)


def _oracle(q, k, v, **mask_kwargs):
    """Dense softmax over repeated kv heads with the element-wise rule mask."""
    (B, T, H, D), (S, J) = q.shape, k.shape[1:3]
    mask_B1TS = _visible_by_rule(B, T, S, **mask_kwargs)[:, None]
    k_BSHD, v_BSHD = k.repeat_interleave(H // J, dim=2), v.repeat_interleave(H // J, dim=2)
    scores_BHTS = torch.einsum("bthd,bshd->bhts", q, k_BSHD) * D**-0.5
    weights_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", weights_BHTS, v_BSHD)


def _outputs_and_grads(fn, q, k, v, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("fn", [attention, attention_reference], ids=["attention", "reference"])
@pytest.mark.parametrize("window,num_docs", MASK_CASES)
@pytest.mark.parametrize("T", [1, 63, 65])
def test_matches_rule_oracle(fn, window, num_docs, T):
    q, k, v = _qkv(2, T, 4, 2, 8, seed=T)
    doc_ids = _doc_ids(2, T, min(num_docs, T), seed=T)
    out, grads = _outputs_and_grads(fn, q, k, v, window=window, doc_ids_BT=doc_ids)
    want, want_grads = _outputs_and_grads(_oracle, q, k, v, window=window, doc_ids=doc_ids)
    torch.testing.assert_close(out, want, **F64)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, **F64)


@pytest.mark.parametrize("window,num_docs", MASK_CASES)
def test_positions_path_with_cached_prefix(window, num_docs):
    """Queries T0..T-1 over a shuffled 'cache' of keys 0..T-1 plus empty slots equal the
    corresponding rows of the full pass (the prefix plays the role of an initial state)."""
    B, T, T0 = 2, 21, 13
    q, k, v = _qkv(B, T, 4, 2, 8, seed=1)
    doc_ids = _doc_ids(B, T, num_docs, seed=1)
    full = attention(q, k, v, window=window, doc_ids_BT=doc_ids)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    num_empty = 4
    k_pos = torch.cat((torch.arange(T)[perm], torch.full((num_empty,), -1))).expand(B, -1)
    order = torch.cat((perm, torch.zeros(num_empty, dtype=torch.int64)))
    # Empty slots hold garbage (a copy of key 0) that the mask must ignore.
    k_cache, v_cache = k[:, order], v[:, order]
    q_pos = torch.arange(T0, T).expand(B, -1)
    q_doc = k_doc = None
    if doc_ids is not None:
        q_doc, k_doc = doc_ids[:, T0:], torch.cat((doc_ids[:, order[:T]], doc_ids[:, :num_empty]), dim=1)
    out, grads = _outputs_and_grads(
        attention, q[:, T0:], k_cache, v_cache,
        window=window, doc_ids_BT=q_doc, q_pos_BT=q_pos, k_pos_BS=k_pos, k_doc_BS=k_doc,
    )
    want, want_grads = _outputs_and_grads(
        _oracle, q[:, T0:], k_cache, v_cache, window=window, doc_ids=q_doc, q_pos=q_pos, k_pos=k_pos, k_doc=k_doc
    )
    torch.testing.assert_close(out, full[:, T0:], **F64)
    torch.testing.assert_close(out, want, **F64)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, **F64)


@pytest.mark.parametrize("window,num_docs", MASK_CASES)
def test_causality(window, num_docs):
    T, t = 40, 17
    q, k, v = _qkv(2, T, 4, 4, 8, seed=2)
    doc_ids = _doc_ids(2, T, num_docs, seed=2)
    base = attention(q, k, v, window=window, doc_ids_BT=doc_ids)
    for x in (q, k, v):
        x[:, t:] += 1.0
    changed = attention(q, k, v, window=window, doc_ids_BT=doc_ids)
    assert torch.equal(changed[:, :t], base[:, :t])
    assert not torch.allclose(changed[:, t:], base[:, t:])


@pytest.mark.parametrize("window", [None, 6])
def test_packed_documents_equal_documents_alone(window):
    lengths = (9, 14, 1)
    T = sum(lengths)
    q, k, v = _qkv(1, T, 4, 2, 8, seed=4)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = attention(q, k, v, window=window, doc_ids_BT=doc_ids)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        alone = attention(q[:, part], k[:, part], v[:, part], window=window)
        torch.testing.assert_close(packed[:, part], alone, **F64)
        start += length


def test_window_covering_sequence_equals_full_and_window_one_is_identity():
    q, k, v = _qkv(2, 33, 4, 2, 8, seed=5)
    full = attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, window=33), full, **F64)
    torch.testing.assert_close(attention(q, k, v, window=1000), full, **F64)
    torch.testing.assert_close(attention(q, k, v, window=1), v.repeat_interleave(2, dim=2), **F64)


@pytest.mark.parametrize("window,num_docs", MASK_CASES)
def test_gqa_equals_repeated_kv_heads(window, num_docs):
    q, k, v = _qkv(2, 30, 6, 2, 8, seed=6)
    doc_ids = _doc_ids(2, 30, num_docs, seed=6)
    gqa = attention(q, k, v, window=window, doc_ids_BT=doc_ids)
    mha = attention(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), window=window, doc_ids_BT=doc_ids)
    torch.testing.assert_close(gqa, mha, **F64)


@pytest.mark.parametrize("window,num_docs", MASK_CASES)
def test_float32_matches_reference_and_scale_is_used(window, num_docs):
    q, k, v = _qkv(2, 50, 4, 2, 16, dtype=torch.float32, seed=8)
    doc_ids = _doc_ids(2, 50, num_docs, seed=8)
    kwargs = dict(window=window, doc_ids_BT=doc_ids, scale=0.3)
    out = attention(q, k, v, **kwargs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_reference(q, k, v, **kwargs), atol=2e-6, rtol=0)
    want = attention_reference(q.double(), k.double(), v.double(), **kwargs)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)


def test_bfloat16_returns_bfloat16_close_to_float64():
    q, k, v = _qkv(2, 40, 4, 2, 16, dtype=torch.bfloat16, seed=9)
    out = attention(q, k, v, window=7)
    assert out.dtype == torch.bfloat16
    want = attention_reference(q.double(), k.double(), v.double(), window=7)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=0)


def _bad_calls():
    q, k, v = _qkv(2, 5, 4, 2, 8)
    pos = torch.arange(5).expand(2, 5)
    k3, v3 = k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)
    return {
        "3-d q": lambda: attention(q[0], k, v),
        "kv heads do not divide": lambda: attention(q, k3, v3),
        "k/v mismatch": lambda: attention(q, k, v[:, :4]),
        "head dim mismatch": lambda: attention(q, k[..., :4], v),
        "mixed dtypes": lambda: attention(q, k.float(), v),
        "S != T without positions": lambda: attention(q, k[:, :4], v[:, :4]),
        "window 0": lambda: attention(q, k, v, window=0),
        "only q positions": lambda: attention(q, k, v, q_pos_BT=pos),
        "doc ids shape": lambda: attention(q, k, v, doc_ids_BT=torch.zeros(2, 4, dtype=torch.int64)),
        "float doc ids": lambda: attention(q, k, v, doc_ids_BT=torch.zeros(2, 5)),
        "k_doc without doc ids": lambda: attention(q, k, v, q_pos_BT=pos, k_pos_BS=pos, k_doc_BS=pos),
        "positions and doc ids without k_doc": lambda: attention(q, k, v, doc_ids_BT=pos, q_pos_BT=pos, k_pos_BS=pos),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_value_error(case):
    with pytest.raises(ValueError, match="attention"):
        _bad_calls()[case]()
