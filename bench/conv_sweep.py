"""Tile sweep of braid's causal conv backward (braid.kernels.ssd.conv_triton) at a config's
Mamba-2 conv shape: the first pass (one tile per program, or `steps` tiles walked in time
order) and the second pass (dx) on tiles of their own, each timed alone as a CUDA-graph replay
(median of triton.testing.do_bench), then the whole backward at the best of each.

    python3 bench/conv_sweep.py --config hybrid-374m --seq-len 8192 --batch-size 2 [--documents 512]

Every config first runs once against the module's defaults: dx, dweight and dbias must match
(dx bit for bit: both passes round the same float32 dpre and sum the same taps in one order;
the weight and bias gradients within 1e-5, partials summed in another grouping). A config
whose launch fails (a Triton compile error or fault) is printed and skipped. What it finds
goes into the module's constants (BLOCK_T_BWD, BLOCK_C_BWD, NUM_WARPS_BWD, BWD_STEPS,
BLOCK_T_DX, BLOCK_C_DX, NUM_WARPS_DX) after the GPU tests pass at it.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from braid.configs import MODEL_CONFIGS
from braid.configs.bench import BENCH_CONFIGS

FIRST_PASS = [  # (BT, BC, warps, steps)
    (128, 64, 4, 1), (128, 64, 8, 1), (64, 64, 8, 1), (32, 64, 4, 1),
    *((bt, bc, w, s) for bt, bc, w, s in itertools.product((16, 32), (64, 128), (4, 8), (4, 8, 16))),
]
SECOND_PASS = [(bt, bc, w) for bt, bc, w in itertools.product((32, 64, 128), (64, 128), (4, 8))]


def conv_shape(name: str, seq_len: int, batch_size: int) -> tuple[int, int, int, int]:
    cfg = {**MODEL_CONFIGS, **BENCH_CONFIGS}[name]()
    m = cfg.mamba2
    channels = m.expand * cfg.d_model + 2 * m.n_groups * m.d_state  # x, B and C through one conv
    return batch_size, seq_len, channels, m.d_conv


def graph_time_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="hybrid-374m")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--documents", type=int, default=0, help="mean document length (0: rows only)")
    args = parser.parse_args()

    from braid.kernels.ssd import conv_triton

    B, T, C, K = conv_shape(args.config, args.seq_len, args.batch_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, C, generator=gen, device="cuda").to(torch.bfloat16)
    dy = torch.randn(B, T, C, generator=gen, device="cuda").to(torch.bfloat16)
    weight = torch.randn(C, K, generator=gen, device="cuda") * 0.5
    bias = torch.randn(C, generator=gen, device="cuda")
    doc_ids = None
    if args.documents:
        doc_ids = (torch.rand(B, T, generator=gen, device="cuda") < 1 / args.documents).cumsum(dim=1)
    documents = args.documents or "none"
    print(f"# {torch.cuda.get_device_name()}, conv backward B{B} T{T} C{C} K{K} bf16, documents: {documents}")
    want = conv_triton.conv_backward(dy, x, weight, bias, doc_ids, True)

    def run(**kw):
        return lambda: conv_triton.conv_backward(dy, x, weight, bias, doc_ids, True, **kw)

    def agrees(got) -> bool:
        dx, dw, db = got
        return torch.equal(dx, want[0]) and all(
            ((g - w).norm() / w.norm()).item() < 1e-5 for g, w in ((dw, want[1]), (db, want[2]))
        )

    results = {}
    for name, configs, keyword in (("first pass", FIRST_PASS, None), ("second pass", SECOND_PASS, "dx_tiles")):
        print(f"\n## {name} (the whole backward timed, the other pass at the defaults)")
        for config in configs:
            kw = {"dx_tiles": config} if keyword else dict(zip(("block_t", "block_c", "num_warps", "steps"), config))
            try:
                ok = agrees(run(**kw)())
                us = graph_time_us(run(**kw))
            except Exception as error:  # a compile error or a fault: report it, go on
                print(f"{config}: failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            results[(name, config)] = us
            print(f"{config}: {us:8.1f} us{'' if ok else '  DIFFERS from the defaults'}")
    default_us = graph_time_us(run())
    best_first = min((c for n, c in results if n == "first pass"), key=lambda c: results[("first pass", c)])
    best_second = min((c for n, c in results if n == "second pass"), key=lambda c: results[("second pass", c)])
    both = dict(zip(("block_t", "block_c", "num_warps", "steps"), best_first), dx_tiles=best_second)
    print(f"\ndefaults {default_us:.1f} us; best first pass {best_first} and second pass {best_second} together: "
          f"{graph_time_us(run(**both)):.1f} us")


if __name__ == "__main__":
    main()
