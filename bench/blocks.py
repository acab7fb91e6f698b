"""GPU time of each sublayer kind of a config, forward + backward, and the kernels it runs.

    python3 bench/blocks.py --config hybrid-374m --seq-len 8192 --batch-size 2 [--kernels SPEC]

A step's profile sums kernels over the whole model; this splits it by sublayer: for each
distinct mixer kind (Mamba-2, GLA, sliding window, full attention) and FFN kind (SwiGLU, MoE,
MatFormer) of the config, the first such layer runs norm + sublayer, forward and backward
(bf16 autocast over fp32 weights, per-sublayer torch.compile unless `--eager`), captured in
a CUDA graph and replayed, so the time is the GPU's (no launch gaps). Each row gives the ms
of one sublayer, how many the config has, their total, its TFLOP/s by braid.model.flops'
count (matmuls plus the mixer's sequence work, as MFU counts them) and the share of the
989 TFLOP/s peak, and the sublayer's top kernels (summed by name, with counts) from a
profiled replay. With `--against SPEC` each sublayer is also captured under a second
BRAID_KERNELS spec, and the two graphs are timed in alternation (`--rounds` rounds), so that
drift between runs (the same MoE block measured 2.093 and 2.148 ms in two runs of one call,
docs/benchmarks.md, thirteenth measurement) falls on both alike; the row then gives both
medians and their ratio with its per-round range. Kernels that run at the same time on two
streams (the SSD and GLA backwards, braid.kernels.streams) each count their own time, so a sublayer's kernel rows
can add up to more than its ms; BRAID_SIDE_STREAM=0 times them one at a time. The totals
add up to the model's blocks; embedding, head, loss and optimizer are not included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

import torch
import triton

from braid.kernels.backend import probe_all, use_backends
from braid.model import build_model
from braid.model.flops import layer_flops
from braid.model.pattern import LayerSpec
from graphs import cuda_graph  # bench/graphs.py
from throughput import PEAK_BF16_FLOPS, resolve_config  # bench/throughput.py: configs, the MFU peak


def sublayers(model) -> dict[str, tuple[LayerSpec, torch.nn.Module, torch.nn.Module, int]]:
    """{"mixer:KIND" or "ffn:KIND": (spec, norm, module, count)} for the first layer of each kind."""
    found: dict[str, list] = {}
    for block in model.layers.values():
        spec = block.spec
        for part, kind in (("mixer", spec.mixer), ("ffn", spec.ffn)):
            if kind is None:
                continue
            key = f"{part}:{kind}" + (f"{spec.window}" if kind == "sliding" and spec.window else "")
            if key not in found:
                found[key] = [spec, getattr(block, f"{part}_norm"), getattr(block, part), 0]
            found[key][3] += 1
    return {k: tuple(v) for k, v in found.items()}


def graphed_fwd_bwd(kind: str, norm, module, x_BTD, compile_: bool):
    """A CUDA graph of norm + module forward and backward on x_BTD (grads of x and the weights)."""

    def sublayer(x):
        h = norm(x)
        out = module(h, None) if kind.startswith("mixer:") else module(h)
        if isinstance(out, tuple):  # MoE: (y, aux losses)
            y, aux = out
            return y, sum(aux.values())
        return out, None

    fn = torch.compile(sublayer) if compile_ else sublayer
    params = [p for p in list(norm.parameters()) + list(module.parameters()) if p.requires_grad]
    dy = torch.randn_like(x_BTD)

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y, aux = fn(x_BTD)
        outs, grads = [y], [dy.to(y.dtype)]
        if aux is not None:
            outs.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.grad(outs, [x_BTD, *params], grads)

    return cuda_graph(run)


def interleaved(replays: list, rounds: int, time_one=None) -> list[list[float]]:
    """Per-round times of each replay function, timed in alternation: rounds x len(replays) ms.

    time_one(fn) -> ms defaults to a median of triton.testing.do_bench."""
    if time_one is None:
        def time_one(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    return [[time_one(fn) for fn in replays] for _ in range(rounds)]


def ab_summary(times: list[list[float]]) -> tuple[float, float, float, float, float]:
    """(median A ms, median B ms, B/A of the medians, lowest and highest per-round B/A)."""
    a, b = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    ratios = [t[1] / t[0] for t in times]
    return a, b, b / a, min(ratios), max(ratios)


def top_kernels(graph, rows: int) -> list[tuple[str, int, float]]:
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name][0] += 1
            by_name[event.name][1] += event.device_time / 1000
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return [(name, n, ms) for name, (n, ms) in ranked[:rows]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="hybrid-374m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. mamba2.chunk_size=256; repeatable")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--kernels", default="auto", help="BRAID_KERNELS spec for the run")
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the sublayers")
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per sublayer")
    parser.add_argument("--only", default=None, help="comma list of sublayer kinds, e.g. ffn:moe,mixer:mamba2")
    parser.add_argument("--against", default=None,
                        help="a second BRAID_KERNELS spec, timed in alternation with --kernels (an A/B)")
    parser.add_argument("--rounds", type=int, default=9, help="alternations of an --against A/B")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/blocks.py needs a CUDA device")
    torch.manual_seed(0)
    probe_all()
    cfg = resolve_config(args.config, args.seq_len, args.set)
    model = build_model(cfg, device="cuda", seed=0).train()
    print(f"# {torch.cuda.get_device_name()}, {args.config} B{args.batch_size} T{args.seq_len}, "
          f"kernels {args.kernels}, {'eager' if args.eager else 'compiled per sublayer'}; command: "
          f"{' '.join(sys.argv)}", flush=True)
    total = 0.0
    table = []
    with use_backends(args.kernels):
        for kind, (spec, norm, module, count) in sublayers(model).items():
            if args.only and kind not in args.only.split(","):
                continue
            x_BTD = torch.randn(args.batch_size, args.seq_len, cfg.d_model, device="cuda", requires_grad=True)
            graph = graphed_fwd_bwd(kind, norm, module, x_BTD, not args.eager)
            if args.against:
                torch._dynamo.reset()  # the second spec compiles its own graph (the first stays captured)
                with use_backends(args.against):
                    other = graphed_fwd_bwd(kind, norm, module, x_BTD, not args.eager)
                ms, other_ms, ratio, low, high = ab_summary(interleaved([graph.replay, other.replay], args.rounds))
                print(f"\n## {kind} A/B: {args.kernels} {ms:.3f} ms, {args.against} {other_ms:.3f} ms, "
                      f"B/A {ratio:.3f} (rounds {low:.3f}-{high:.3f})", flush=True)
                del other
            else:
                ms = triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")
            total += ms * count
            # braid.model.flops' count: forward FLOPs per token, x3 for forward + backward
            flops = 3 * layer_flops(cfg, spec, args.seq_len)[kind.split(":")[0]] * args.batch_size * args.seq_len
            tflops = flops / ms / 1e9
            table.append(f"{kind:20s} {ms:8.3f} ms  x{count:<3d} {ms * count:8.2f} ms  {tflops:6.1f} TFLOP/s"
                         f"  {100e12 * tflops / PEAK_BF16_FLOPS:5.1f}% of peak")
            print(f"\n## {kind}: {ms:.3f} ms fwd+bwd, {count} in the model", flush=True)
            for name, n, k_ms in top_kernels(graph, args.rows):
                print(f"  {k_ms:7.3f} ms  x{n:<4d} {name[:110]}")
            del graph
            torch.cuda.empty_cache()
    print("\n" + "\n".join(table))
    print(f"{'all sublayers':20s} {'':8s}        {'':4s} {total:8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
