"""Each fast kernel against its reference and the best public alternative, forward + backward,
on one GPU, at the training shapes of hybrid-374m (batch 2 x 8192 tokens, bf16).

    python bench/kernels.py [--only attention,ssd] [--budget-s 240] [--out kernels.jsonl] [--graph]

Times are medians of triton.testing.do_bench over forward + backward (torch.autograd.grad of
every output against fixed cotangents), after one untimed call whose duration is reported
as `first s` (compilation, fla's autotuning). `eager ms` calls the work from the host, which
for the small memory-bound ops (conv, norms) is mostly launch overhead; with `--graph`, `ms`
replays it as a CUDA graph (GPU time without launch gaps, what a graphed training step sees;
bench/blocks.py times whole sublayers that way), else `ms` is the eager time. Entries that
cannot be captured (a read back to the host) keep their eager time, with a note. Matmul-like
ops report TFLOP/s from the nominal FLOPs stated beside each op and the % of a bf16 8192^3
matmul measured in the same run; memory-bound ops (conv, norms, SwiGLU) report GB/s of their
minimal traffic, both from `ms`.
Included: sliding-window (1024) vs full causal attention at T = 8192 (target >= 3x), and
fla vs mamba_ssm for SSD (the faster should be the default, braid.kernels.backend).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton

from braid.kernels.attention import attention
from braid.kernels.backend import pick, unavailable_reason, use_backends
from braid.kernels.cross_entropy import linear_cross_entropy
from braid.kernels.gla import gla
from braid.kernels.moe import grouped_swiglu, router_logits, weighted_combine
from braid.kernels.norm import gated_rms_norm, rms_norm
from braid.kernels.ssd import causal_conv1d, ssd
from braid.kernels.ssd.conv import causal_conv1d_reference
from braid.kernels.swiglu import silu_mul
from graphs import cuda_graph  # bench/graphs.py

B, T = 2, 8192
BF16 = torch.bfloat16


@dataclass
class Result:
    op: str
    variant: str
    shape: str
    ms: float | None = None  # with --graph the CUDA-graph replay (unless it cannot be captured), else eager
    eager_ms: float | None = None
    tflops: float | None = None
    gbs: float | None = None
    pct_ceiling: float | None = None
    peak_gib: float | None = None
    first_s: float | None = None
    note: str = ""


def randn(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def fwd_bwd(fn, leaves: dict):
    """A closure running fn(**leaves) forward and backward (grads of every float leaf)."""
    leaves = {k: v.requires_grad_(v.is_floating_point()) if v is not None else None for k, v in leaves.items()}
    wrt = [v for v in leaves.values() if v is not None and v.requires_grad]
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cotangents = [torch.randn_like(o) for o in outs]

    def run():
        outs = fn(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, wrt, cotangents)

    return run


class Bench:
    """Runs entries, keeps results (appending each to `out` as it completes), and skips the
    remaining entries once the time budget is spent."""

    def __init__(self, budget_s: float | None, out: str | None, graph: bool = False):
        self.results: list[Result] = []
        self.graph = graph
        self.deadline = None if budget_s is None else time.time() + budget_s
        self.ceiling_tflops: float | None = None
        self.out = out
        self.card = torch.cuda.get_device_name()
        self.stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def add(self, op, variant, shape, make_run, *, flops=None, bytes_moved=None, backend=None, force=None):
        """Time the closure make_run() returns, under `force` (a BRAID_KERNELS spec).

        backend = (op, name, probe tensors): the entry is reported unavailable unless `pick`
        chooses that backend for the probe under `force`.
        """
        result = Result(op, variant, shape)
        self.results.append(result)
        if self.deadline is not None and time.time() > self.deadline:
            result.note = "skipped: time budget spent"
        else:
            self._run(result, make_run, flops, bytes_moved, backend, force)
        ms = "-" if result.ms is None else f"{result.ms:.3f} ms"
        eager = "" if result.eager_ms is None else f"eager {result.eager_ms:.3f} ms"
        print(f"{op:11s} {variant:30s} {ms:>12s}  {eager:16s}  first {result.first_s} s  {result.note}", flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps({"card": self.card, "date": self.stamp, **asdict(result)}) + "\n")
        return result

    def _run(self, result, make_run, flops, bytes_moved, backend, force) -> None:
        try:
            with use_backends(force or "auto"):
                if backend is not None:
                    op_name, name, probe = backend
                    chosen = pick(op_name, *probe)
                    if chosen != name:
                        result.note = f"unavailable ({unavailable_reason(op_name, name) or 'picked ' + chosen})"
                        return
                self._measure(result, make_run, flops, bytes_moved)
        except Exception as error:  # one failing entry must not stop the benchmark; it is reported
            result.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    def _measure(self, result: Result, make_run, flops, bytes_moved) -> None:
        torch.cuda.reset_peak_memory_stats()
        started = time.time()
        run = make_run()
        run()
        torch.cuda.synchronize()
        result.first_s = round(time.time() - started, 1)
        result.eager_ms = result.ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
        if self.graph:
            try:
                graph = cuda_graph(run)
            except Exception as error:  # e.g. a host read-back inside run: eager time only
                result.note = f"not graphed ({type(error).__name__}); eager time"
            else:
                result.ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
                del graph
        result.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if flops is not None:
            result.tflops = round(flops / result.ms / 1e9, 1)
            if self.ceiling_tflops:
                result.pct_ceiling = round(100 * result.tflops / self.ceiling_tflops, 1)
        if bytes_moved is not None:
            result.gbs = round(bytes_moved / result.ms / 1e6, 1)

    def ms(self, op: str, variant: str, eager: bool = False) -> float | None:
        """An entry's time (`eager`: its eager time), None where it did not run."""
        result = next((r for r in self.results if r.op == op and r.variant == variant), None)
        return None if result is None else result.eager_ms if eager else result.ms


def bench_matmul(bench: Bench) -> None:
    n = 8192
    a, b = randn(n, n), randn(n, n)
    result = bench.add("matmul", "bf16 8192^3", f"{n}^3", lambda: (lambda: a @ b), flops=2 * n**3)
    bench.ceiling_tflops = result.tflops
    if result.tflops:
        result.pct_ceiling = 100.0


# FlexAttention Triton options tried for the window (None = flex's defaults, the "flex" rows).
FLEX_OPTIONS = {
    "M128 N64 w8": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "M128 N128 w8": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "M64 N64 w4 s3": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "bwd M64 N128": {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 8},
}


def attention_flops(window: int | None, H: int, D: int) -> float:
    """4*B*H*D per visible (query, key) pair forward; forward + backward = 3.5x (FlashAttention's count)."""
    pairs = T * (T + 1) / 2 if window is None else T * window - window * (window - 1) / 2
    return 3.5 * 4 * B * H * D * pairs


def bench_attention(bench: Bench) -> None:
    H, J, D, window = 16, 4, 64, 1024
    shape = f"B{B} T{T} H{H} J{J} D{D}"

    def make(window, doc_ids=None, options=None):
        leaves = dict(q_BTHD=randn(B, T, H, D), k_BSJD=randn(B, T, J, D), v_BSJD=randn(B, T, J, D))

        def run(**kw):
            from braid.kernels.attention import flex

            flex.KERNEL_OPTIONS = options
            try:
                return attention(**kw, window=window, doc_ids_BT=doc_ids)
            finally:
                flex.KERNEL_OPTIONS = None

        return lambda: fwd_bwd(run, leaves)

    probe = (torch.empty(1, device="cuda", dtype=BF16),)
    docs = (torch.rand(B, T, device="cuda") < 1 / 1024).cumsum(dim=1)
    full, slide = attention_flops(None, H, D), attention_flops(window, H, D)
    bench.add("attention", "full: sdpa (cuDNN)", shape, make(None), flops=full, force="attention=sdpa",
              backend=("attention", "sdpa", probe))
    bench.add("attention", "full: flex", shape, make(None), flops=full, force="attention=flex",
              backend=("attention", "flex", probe))
    bench.add("attention", "full: flash-attn", shape, make(None), flops=full, force="attention=flash_attn",
              backend=("attention", "flash_attn", probe))
    bench.add("attention", "full: cudnn band", shape, make(None), flops=full, force="attention=cudnn",
              backend=("attention", "cudnn", probe))
    bench.add("attention", "full: reference (fp32 sdpa)", shape, make(None), flops=full, force="reference")
    bench.add("attention", f"window {window}: cudnn", shape, make(window), flops=slide, force="attention=cudnn",
              backend=("attention", "cudnn", probe))
    bench.add("attention", f"window {window} + docs: cudnn", shape, make(window, docs), flops=slide,
              force="attention=cudnn", backend=("attention", "cudnn", probe))
    bench.add("attention", f"window {window}: flex", shape, make(window), flops=slide, force="attention=flex",
              backend=("attention", "flex", probe))
    bench.add("attention", f"window {window}: flash-attn", shape, make(window), flops=slide,
              force="attention=flash_attn", backend=("attention", "flash_attn", probe))
    bench.add("attention", f"window {window}: torch flash", shape, make(window), flops=slide,
              force="attention=torch_flash", backend=("attention", "torch_flash", probe))
    bench.add("attention", f"window {window} + docs: torch flash", shape, make(window, docs), flops=slide,
              force="attention=torch_flash", backend=("attention", "torch_flash", probe))
    bench.add("attention", f"window {window}: reference", shape, make(window), flops=slide, force="reference")
    for name, options in FLEX_OPTIONS.items():
        bench.add("attention", f"window {window}: flex {name}", shape, make(window, options=options), flops=slide,
                  force="attention=flex", backend=("attention", "flex", probe))
    bench.add("attention", f"window {window} + docs: flex", shape, make(window, docs), flops=slide,
              force="attention=flex", backend=("attention", "flex", probe))

    def mask_build():
        from braid.kernels.attention.flex import create_causal_block_mask

        return lambda: create_causal_block_mask(T, window, docs, docs.device)

    bench.add("attention", "flex doc block mask build", f"B{B} T{T}", mask_build, force="attention=flex")


def ssd_leaves(H=32, P=64, G=1, N=128):
    return dict(
        x_BTHP=randn(B, T, H, P),
        dt_BTH=F.softplus(torch.randn(B, T, H, device="cuda") - 3),
        A_H=-torch.exp(torch.rand(H, device="cuda") * 2.7),
        B_BTGN=randn(B, T, G, N, scale=N**-0.5),
        C_BTGN=randn(B, T, G, N, scale=N**-0.5),
        D_H=torch.randn(H, device="cuda"),
    )


def bench_ssd(bench: Bench) -> None:
    H, P, G, N, Q = 32, 64, 1, 128, 64
    shape = f"B{B} T{T} H{H} P{P} G{G} N{N}"
    flops = 3 * B * T * (H * (2 * Q * P + 4 * N * P) + G * 2 * Q * N)  # braid.model.flops' SSD term, chunk 64
    probe = (torch.empty(1, device="cuda", dtype=BF16),)

    def make(chunk):
        return lambda: fwd_bwd(lambda **kw: ssd(**kw, chunk_size=chunk), ssd_leaves(H, P, G, N))

    bench.add("ssd", "fla chunk_simple_gla", shape, make(128), flops=flops, force="ssd=fla",
              backend=("ssd", "fla", probe))
    for chunk in (128, 256):
        bench.add("ssd", f"mamba_ssm chunk_scan ({chunk})", shape, make(chunk), flops=flops, force="ssd=mamba_ssm",
                  backend=("ssd", "mamba_ssm", probe))
    bench.add("ssd", "reference (chunk 128)", shape, make(128), flops=flops, force="reference")


def bench_gla(bench: Bench) -> None:
    H, K, V, C = 8, 64, 128, 64
    shape = f"B{B} T{T} H{H} K{K} V{V}"
    flops = 3 * B * T * H * (2 * C * (K + V) + 4 * K * V)  # braid.model.flops' GLA term

    def make():
        leaves = dict(
            q_BTHK=randn(B, T, H, K), k_BTHK=randn(B, T, H, K), v_BTHV=randn(B, T, H, V),
            g_BTHK=(F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).to(BF16),
        )
        return fwd_bwd(lambda **kw: gla(**kw), leaves)

    probe = (torch.empty(1, device="cuda", dtype=BF16),)
    bench.add("gla", "fla chunk_gla", shape, make, flops=flops, force="gla=fla", backend=("gla", "fla", probe))
    bench.add("gla", "reference (chunk 64)", shape, make, flops=flops, force="reference")


def chunk_log2_gates(H: int, K: int, C: int):
    """GLA gates as fla's chunk kernels take them, (B, T, H, K) float32: log-sigmoid decays
    (normaliser 16, hybrid-374m's) summed within each chunk of C steps, in log2 units."""
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum

    return chunk_local_cumsum(F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16, C, scale=RCP_LN2)


def bench_gla_intra(bench: Bench) -> None:
    """GLA's in-chunk backward (dq, dk from dA), one step of the GLA backward: braid's kernel
    (one dot per diagonal block) against fla's `chunk_gla_bwd_dqk_intra` (row by row there)."""
    from fla.ops.gla.chunk import chunk_gla_bwd_dqk_intra

    H, K, C = 8, 64, 64
    shape = f"B{B} T{T} H{H} K{K} chunk {C}"

    def inputs():
        g = chunk_log2_gates(H, K, C)
        return randn(B, T, H, K), randn(B, T, H, K), g, torch.randn(B, T, H, C, device="cuda")

    def braid():
        from braid.kernels.gla.intra_triton import gla_bwd_intra

        q, k, g, dA = inputs()
        return lambda: gla_bwd_intra(q, k, g, dA, chunk_size=C)

    def fla():
        q, k, g, dA = inputs()
        return lambda: chunk_gla_bwd_dqk_intra(q=q, k=k, g=g, dA=dA, chunk_size=C)

    bytes_moved = B * T * H * (2 * K * 2 + K * 4 + C * 4 + 2 * K * 4)  # q, k bf16; g, dA, dq, dk float32
    probe = (torch.empty(1, device="cuda", dtype=BF16),)
    bench.add("gla_intra", "braid triton", shape, braid, bytes_moved=bytes_moved, force="gla_intra=triton",
              backend=("gla_intra", "triton", probe))
    bench.add("gla_intra", "fla", shape, fla, bytes_moved=bytes_moved)


def bench_gla_scan(bench: Bench) -> None:
    """GLA's pass over the chunks (the states entering each chunk; their gradients), one step of
    the GLA forward and one of its backward: braid's two kernels (chunk-local terms, then an
    element-wise pass) against fla's `chunk_fwd_h` and `chunk_bwd_dh` (one sequential kernel)."""
    from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h

    H, K, V, C = 8, 64, 128, 64
    shape = f"B{B} T{T} H{H} K{K} V{V} chunk {C}"

    def inputs():
        g = chunk_log2_gates(H, K, C)
        return randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V), randn(B, T, H, V), g

    def braid(backward):
        from braid.kernels.gla.scan_triton import gla_state_grads, gla_states

        q, k, v, do, g = inputs()
        if backward:
            return lambda: gla_state_grads(q, do, g, K**-0.5, chunk_size=C)
        return lambda: gla_states(k, v, g, chunk_size=C)

    def fla(backward):
        q, k, v, do, g = inputs()
        if backward:
            return lambda: chunk_bwd_dh(q=q, k=k, v=v, g=None, gk=g, gv=None, do=do, h0=None, dht=None,
                                        scale=K**-0.5, chunk_size=C, states_in_fp32=True)
        return lambda: chunk_fwd_h(k=k, v=v, g=None, gk=g, gv=None, h0=None, output_final_state=False,
                                   chunk_size=C, states_in_fp32=True)

    states_bytes = B * -(-T // C) * H * K * V * 4
    bytes_moved = B * T * H * (K * 2 + V * 2 + K * 4) + states_bytes  # inputs once, states written once
    probe = (torch.empty(1, device="cuda", dtype=BF16),)
    for name, backward in (("fwd", False), ("bwd", True)):
        bench.add("gla_scan", f"braid triton {name}", shape, lambda b=backward: braid(b), bytes_moved=bytes_moved,
                  force="gla_scan=triton", backend=("gla_scan", "triton", probe))
        bench.add("gla_scan", f"fla {name}", shape, lambda b=backward: fla(b), bytes_moved=bytes_moved)


def bench_gla_dv(bench: Bench) -> None:
    """GLA's value gradient dv (one step of the GLA backward): braid's kernel (the in-chunk term
    a 3xTF32 dot) against fla's `chunk_gla_bwd_dv` (that term a float32 FMA dot)."""
    from fla.ops.gla.chunk import chunk_gla_bwd_dv

    H, K, V, C = 8, 64, 128, 64
    NT = -(-T // C)
    shape = f"B{B} T{T} H{H} K{K} V{V} chunk {C}"

    def inputs():
        k, do = randn(B, T, H, K), randn(B, T, H, V)
        A = torch.randn(B, T, H, C, device="cuda")
        dh = torch.randn(B, NT, H, K, V, device="cuda")
        return k, chunk_log2_gates(H, K, C), A, do, dh

    def braid():
        from braid.kernels.gla.dv_triton import gla_bwd_dv

        k, g, A, do, dh = inputs()
        return lambda: gla_bwd_dv(k, g, A, do, dh, chunk_size=C)

    def fla():
        k, g, A, do, dh = inputs()
        return lambda: chunk_gla_bwd_dv(k=k, g=g, A=A, do=do, dh=dh, chunk_size=C)

    # k, g, A, do and dh read once, dv written
    bytes_moved = B * T * H * (K * 2 + K * 4 + C * 4 + V * 2 + V * 2) + B * NT * H * K * V * 4
    flops = 2 * B * T * H * V * (C + K)
    bench.add("gla_dv", "braid triton", shape, braid, flops=flops, bytes_moved=bytes_moved, force="gla_dv=triton",
              backend=("gla_dv", "triton", (torch.empty(1, device="cuda", dtype=BF16),)))
    bench.add("gla_dv", "fla", shape, fla, flops=flops, bytes_moved=bytes_moved)


def bench_ssd_pass(bench: Bench) -> None:
    """Mamba-2's pass over the chunks (SSD's state passing), one step of the SSD forward and one
    of its backward, at hybrid-374m's shape: braid's kernels (STEP chunks a loop step, a scan
    over them) against mamba_ssm's `_state_passing_fwd` and `_state_passing_bwd` (one chunk a
    loop step)."""
    from braid.kernels.ssd.mamba_ssm import _combined

    H, D, L = 32, 64 * 128, 128
    C = -(-T // L)
    shape = f"B{B} T{T} H{H} P64 N128 chunk {L}"

    def inputs():
        states, dbefore = (torch.randn(B, C, H, D, device="cuda") for _ in range(2))
        dA_last = (-torch.rand(B, H, C, L, device="cuda").cumsum(-1) / L)[..., -1]
        return states, dbefore, dA_last

    def braid(backward):
        from braid.kernels.ssd.pass_triton import state_pass, state_pass_backward

        states, dbefore, dA_last = inputs()
        if backward:
            return lambda: state_pass_backward(states, dA_last, dbefore, None, None, False, BF16, BF16, L)
        return lambda: state_pass(states, dA_last, None, None, L)

    def mamba(backward):
        states, dbefore, dA_last = inputs()
        if backward:
            return lambda: _combined._state_passing_bwd(states, dA_last, dbefore, chunk_size=L,
                                                        dstates_dtype=BF16, states_dtype=BF16)
        return lambda: _combined._state_passing_fwd(states, dA_last, chunk_size=L)

    states_bytes = B * C * H * D * 4
    for name, backward in (("fwd", False), ("bwd", True)):
        # forward: float32 terms read, states written; backward: two float32 reads, two bf16 writes
        bytes_moved = 3 * states_bytes if backward else 2 * states_bytes
        bench.add("ssd_pass", f"braid triton {name}", shape, lambda b=backward: braid(b), bytes_moved=bytes_moved,
                  force="ssd_pass=triton", backend=("ssd_pass", "triton", (torch.empty(1, device="cuda"),)))
        bench.add("ssd_pass", f"mamba_ssm {name}", shape, lambda b=backward: mamba(b), bytes_moved=bytes_moved,
                  force="ssd=mamba_ssm", backend=("ssd", "mamba_ssm", (torch.empty(1, device="cuda"),)))


def bench_conv(bench: Bench) -> None:
    """At the hybrid's conv widths (x, B and C fused: 2304 channels; x alone 2048; B or C 128),
    fla's kernel and braid's own against the reference eager and compiled by inductor."""
    K = 4
    probe = (torch.empty(1, device="cuda", dtype=BF16),)
    compiled_reference = torch.compile(causal_conv1d_reference, dynamic=False)
    for C in (2304, 2048, 128):  # fused x/B/C, x alone, B or C alone
        def make(fn=causal_conv1d, C=C):
            leaves = dict(
                x_BTC=randn(B, T, C), weight_CK=torch.randn(C, K, device="cuda"), bias_C=torch.randn(C, device="cuda")
            )
            return fwd_bwd(lambda **kw: fn(**kw), leaves)

        moved = 5 * B * T * C * 2  # x, y forward; x, dy, dx backward (bf16)
        shape = f"B{B} T{T} C{C} K{K}"
        bench.add("conv", f"fla causal_conv1d C{C}", shape, make, bytes_moved=moved, force="conv=fla",
                  backend=("conv", "fla", probe))
        bench.add("conv", f"braid triton C{C}", shape, make, bytes_moved=moved, force="conv=triton",
                  backend=("conv", "triton", probe))
        bench.add("conv", f"reference, inductor C{C}", shape, lambda C=C: make(compiled_reference, C),
                  bytes_moved=moved)
        bench.add("conv", f"reference C{C}", shape, make, bytes_moved=moved, force="reference")


def bench_norms(bench: Bench) -> None:
    M = B * T
    probe32 = (torch.empty(1, device="cuda"),)

    def make_plain():
        leaves = dict(x=randn(M, 1024, dtype=torch.float32), w=torch.ones(1024, device="cuda"))
        return fwd_bwd(lambda x, w: rms_norm(x, w, 1e-5), leaves)

    moved = 5 * M * 1024 * 4  # x, y forward; x, dy, dx backward (fp32 residual stream)
    for name in ("triton", "liger"):
        bench.add("rms_norm", name, f"{M}x1024 fp32", make_plain, bytes_moved=moved, force=f"norm={name}",
                  backend=("norm", name, probe32))
    bench.add("rms_norm", "reference (eager)", f"{M}x1024 fp32", make_plain, bytes_moved=moved, force="reference")

    for label, D, group, before in (("mamba gate->norm", 2048, 2048, False), ("gla norm->gate", 1024, 128, True)):
        def make_gated(D=D, group=group, before=before):
            leaves = dict(x=randn(M, D), z=randn(M, D), w=torch.ones(D, device="cuda"))
            return fwd_bwd(lambda x, z, w: gated_rms_norm(x, z, w, 1e-5, group, before), leaves)

        moved = 8 * M * D * 2  # x, z, y forward; x, z, dy, dx, dz backward (bf16)
        bench.add("gated_norm", f"{label}: triton", f"{M}x{D}/{group} bf16", make_gated, bytes_moved=moved,
                  force="gated_norm=triton", backend=("gated_norm", "triton", probe32))
        bench.add("gated_norm", f"{label}: reference", f"{M}x{D}/{group} bf16", make_gated, bytes_moved=moved,
                  force="reference")


def bench_swiglu(bench: Bench) -> None:
    M, F_ = B * T, 2816
    moved = 8 * M * F_ * 2  # gate, up, out forward; gate, up, dout, dgate, dup backward

    def make():
        return fwd_bwd(silu_mul, dict(gate=randn(M, F_), up=randn(M, F_)))

    probe = (torch.empty(1, device="cuda", dtype=BF16),)
    bench.add("swiglu", "liger", f"{M}x{F_} bf16", make, bytes_moved=moved, force="swiglu=liger",
              backend=("swiglu", "liger", probe))
    bench.add("swiglu", "reference (eager)", f"{M}x{F_} bf16", make, bytes_moved=moved, force="reference")


def bench_cross_entropy(bench: Bench) -> None:
    N, D, V = B * T, 1024, 32000
    flops = 6 * N * D * V
    labels = torch.randint(0, V, (N,), device="cuda")

    def leaves():
        return dict(hidden_ND=torch.randn(N, D, device="cuda"), weight_VD=torch.randn(V, D, device="cuda") * 0.02)

    def fused():
        def fn(hidden_ND, weight_VD):
            with torch.autocast("cuda", dtype=BF16):
                return linear_cross_entropy(hidden_ND, weight_VD, labels)

        return fwd_bwd(fn, leaves())

    def full_logits():
        def fn(hidden_ND, weight_VD):
            with torch.autocast("cuda", dtype=BF16):
                return F.cross_entropy(F.linear(hidden_ND, weight_VD).float(), labels)

        return fwd_bwd(fn, leaves())

    shape = f"N{N} D{D} V{V} fp32 params, bf16 autocast"
    probe = (torch.empty(1, device="cuda"),)
    bench.add("linear_ce", "liger fused", shape, fused, flops=flops, force="cross_entropy=liger",
              backend=("cross_entropy", "liger", probe))
    bench.add("linear_ce", "reference (chunked, fp32)", shape, fused, flops=flops, force="reference")
    bench.add("linear_ce", "eager full logits", shape, full_logits, flops=flops)


def bench_moe(bench: Bench) -> None:
    E, D, F_, N = 8, 1024, 1408, 2 * B * T
    counts_E = torch.bincount(torch.randint(0, E, (N,), device="cuda"), minlength=E)
    flops = 3 * 3 * 2 * N * D * F_

    def make():
        leaves = dict(
            x_sorted_ND=torch.randn(N, D, device="cuda"),
            w1_EDF=torch.randn(E, D, F_, device="cuda") * 0.02,
            w3_EDF=torch.randn(E, D, F_, device="cuda") * 0.02,
            w2_EFD=torch.randn(E, F_, D, device="cuda") * 0.02,
        )

        def fn(**kw):
            with torch.autocast("cuda", dtype=BF16):
                return grouped_swiglu(counts_E=counts_E, **kw)

        return fwd_bwd(fn, leaves)

    shape = f"N{N} E{E} D{D} F{F_} bf16 autocast"
    probe = (torch.empty(1, device="cuda"),)
    bench.add("moe", "torch._grouped_mm", shape, make, flops=flops, force="moe=grouped_mm",
              backend=("moe", "grouped_mm", probe))
    bench.add("moe", "reference (loop over experts)", shape, make, flops=flops, force="reference")


def bench_router(bench: Bench) -> None:
    """The MoE router's float32 logits: braid's Triton kernels against the reference (x cast to
    float32, cuBLAS's float32 GEMM), forward alone and forward + backward; bf16 tokens, and
    float32 ones (hybrid-374m's MoE input, the normed float32 residual)."""
    N, D = B * T, 1024
    for E, x_dtype in ((8, BF16), (64, BF16), (8, torch.float32)):
        shape = f"N{N} D{D} E{E} {str(x_dtype).removeprefix('torch.')} x, fp32 W"
        probe = (torch.empty(1, device="cuda"), torch.empty(E, D, device="cuda"))

        def forward_only(E=E, x_dtype=x_dtype):
            x_ND, w_ED = randn(N, D, dtype=x_dtype), torch.randn(E, D, device="cuda") * D**-0.5
            return lambda: router_logits(x_ND, w_ED)

        def forward_backward(E=E, x_dtype=x_dtype):
            leaves = dict(x_ND=randn(N, D, dtype=x_dtype), weight_ED=torch.randn(E, D, device="cuda"))
            return fwd_bwd(router_logits, leaves)

        x_bytes = N * D * x_dtype.itemsize
        for name, make in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
            bench.add("router", f"triton {name}", shape, make, bytes_moved=x_bytes * (1 if name == "fwd" else 3),
                      force="router=triton", backend=("router", "triton", probe))
            bench.add("router", f"reference {name}", shape, make, force="reference")


def bench_moe_combine(bench: Bench) -> None:
    """The MoE's weighted combine (hybrid-374m: top-2 of bf16 expert outputs, float32 gates),
    forward + backward, compiled: braid's Triton backward (opt-in) against the reference's, both
    after inductor's forward."""
    N, K, D = B * T, 2, 1024
    order_S = torch.randperm(N * K, device="cuda")
    unsort_S = torch.empty_like(order_S)
    unsort_S[order_S] = torch.arange(N * K, device="cuda")

    def make():  # called under the entry's backends: dynamo's guards on the choice recompile
        compiled = torch.compile(lambda y, g: weighted_combine(y, g, order_S, unsort_S), dynamic=False)
        leaves = dict(y=randn(N * K, D, dtype=BF16), g=torch.rand(N, K, device="cuda"))
        return fwd_bwd(compiled, leaves)

    shape = f"N{N} K{K} D{D} bf16 y, fp32 gates"
    probe = (torch.empty(1, device="cuda"),)
    # forward: y gathered, output written (float32); backward: the gradient and y read, dy written
    bytes_moved = N * K * D * 2 * 3 + N * D * 4 * 2
    bench.add("moe_combine", "triton backward", shape, make, bytes_moved=bytes_moved, force="moe_combine=triton",
              backend=("moe_combine", "triton", probe))
    bench.add("moe_combine", "reference, inductor", shape, make, bytes_moved=bytes_moved, force="reference")


SECTIONS = {
    "attention": bench_attention,
    "norm": bench_norms,
    "swiglu": bench_swiglu,
    "cross_entropy": bench_cross_entropy,
    "moe": bench_moe,
    "router": bench_router,
    "moe_combine": bench_moe_combine,
    "conv": bench_conv,
    "gla": bench_gla,
    "gla_intra": bench_gla_intra,
    "gla_scan": bench_gla_scan,
    "ssd_pass": bench_ssd_pass,
    "gla_dv": bench_gla_dv,
    "ssd": bench_ssd,
}


def summary(bench: Bench) -> list[str]:
    header = f"{'op':11s} {'variant':30s} {'ms':>9s} {'eager ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'%mm':>6s}"
    lines = [header + f" {'GiB':>6s} {'first s':>7s}  note"]
    for r in bench.results:
        cells = [r.ms and f"{r.ms:.3f}", r.eager_ms and f"{r.eager_ms:.3f}", r.tflops, r.gbs, r.pct_ceiling,
                 r.peak_gib, r.first_s]
        ms, eager, tf, gb, pct, gib, first = ("-" if c is None else str(c) for c in cells)
        lines.append(f"{r.op:11s} {r.variant:30s} {ms:>9s} {eager:>9s} {tf:>8s} {gb:>7s} {pct:>6s} {gib:>6s} "
                     f"{first:>7s}  {r.note}")
    full, full_flex = bench.ms("attention", "full: sdpa (cuDNN)"), bench.ms("attention", "full: flex")
    full_eager = bench.ms("attention", "full: sdpa (cuDNN)", eager=True)
    for name in ("cudnn", "flex", "torch flash", "flash-attn"):
        slide = bench.ms("attention", f"window 1024: {name}")
        if full and slide:
            verdict = "meets" if full / slide >= 3 else "misses"
            line = (f"sliding window 1024 ({name}) vs full causal at T={T}: {full / slide:.2f}x vs SDPA (cuDNN), "
                    f"{(full_flex or float('nan')) / slide:.2f}x vs flex full; {verdict} the 3x target")
            slide_eager = bench.ms("attention", f"window 1024: {name}", eager=True)
            if bench.graph and full_eager and slide_eager:  # host time included: launch-bound ops lose here
                line += f" (graph replay; eager {full_eager / slide_eager:.2f}x)"
            lines.append(line)
    fla, mamba = bench.ms("ssd", "fla chunk_simple_gla"), bench.ms("ssd", "mamba_ssm chunk_scan (128)")
    if fla and mamba:
        faster = "fla" if fla <= mamba else "mamba_ssm"
        lines.append(f"SSD: fla {fla:.2f} ms vs mamba_ssm {mamba:.2f} ms -> faster: {faster} "
                     f"(FAST_BACKENDS['ssd'] lists {'fla first: keep' if faster == 'fla' else 'fla first: swap'})")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=None, help="skip entries once this many seconds passed")
    parser.add_argument("--out", default=None, help="append one JSON row per entry to this file")
    parser.add_argument("--graph", action="store_true", help="time each entry as a CUDA-graph replay too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA device")
    card = torch.cuda.get_device_name()
    print(f"# {card}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    bench = Bench(args.budget_s, args.out, graph=args.graph)
    bench_matmul(bench)
    sections = SECTIONS if args.only is None else {k: SECTIONS[k] for k in args.only.split(",")}
    for section in sections.values():
        section(bench)
    print("\n".join(summary(bench)), flush=True)


if __name__ == "__main__":
    main()
