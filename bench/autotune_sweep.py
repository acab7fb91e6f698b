"""Search library Triton kernels for autotune configs faster than the ones they ship.

    python3 bench/autotune_sweep.py --op ssd --config hybrid-374m --seq-len 8192 --batch-size 2 [KERNEL ...]
    python3 bench/autotune_sweep.py --op gla --config hybrid-374m --seq-len 8192 --batch-size 2 [KERNEL ...]

Runs braid's fast op forward and backward (`ssd`: mamba_ssm's SSD kernels; `gla`: fla's
chunk_gla kernels) at the config's Mamba-2 or GLA shape, bf16. Phase 1: each kernel's
autotuner times the configs the library lists. Phase 2, one kernel at a time: a wider list
(the library's, its two fastest block shapes under every warp count and 1-4 stages, and every
combination of the block values it lists under the fastest warps and stages) replaces it,
the kernel is tuned again, and the fastest config is printed against the library's best.
Block values are the library's own, so code that sizes buffers by its smallest block stays
valid; `--add-values BV=16` adds a value to the combinations of the kernels that have that key
(only for kernels whose buffers do not depend on it: fla's state kernels `chunk_fwd_kernel_h`
and `chunk_bwd_kernel_dh` tile only their (K, V) output with BK and BV, and run as few programs
as B x H x K/BK x V/BV at hybrid-374m's shape). For `gla` the warp counts are the library's
(fla leaves some out on Hopper).

What it finds goes into braid through braid.kernels.autotune.add_configs (for mamba_ssm,
braid.kernels.ssd.mamba_ssm.EXTRA_CONFIGS), where the autotuner still picks among all
configs; a GPU test runs each added config alone against the reference. No kernel names:
every autotuned kernel the op ran is swept (minutes of compiling).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import types

os.environ.setdefault("BRAID_SIDE_STREAM", "0")  # one stream: the autotuner times each kernel alone


def autotuners(modules) -> dict:
    """{name: triton Autotuner} for the autotuned kernels defined in `modules` (through a
    triton.heuristics wrapper too)."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for module in modules:
        for name, obj in vars(module).items():
            for _ in range(4):
                if isinstance(obj, Autotuner):
                    found[name] = obj
                    break
                obj = getattr(obj, "fn", None)
    return found


def widened_configs(configs: list, timings: dict, warps=(2, 4, 8), stages=(1, 2, 3, 4),
                    extra_values: dict | None = None) -> list:
    """The library's `configs`, then its two fastest block shapes (by `timings`, config -> ms)
    under every warp count and stage count, then every combination of the block values it lists
    (with `extra_values`, {key: values}, for its keys) under the fastest config's warps and
    stages; no repeats (braid.kernels.autotune.add_configs, which also gives each new config the
    list's pre-hook)."""
    from braid.kernels.autotune import add_configs

    ranked = sorted(timings, key=timings.get)
    fastest = ranked[0]
    extra_values = extra_values or {}
    values = {key: sorted({c.kwargs[key] for c in configs} | set(extra_values.get(key, ())))
              for key in fastest.kwargs}
    candidates = [(c.kwargs, w, s) for c in ranked[:2] for w, s in itertools.product(warps, stages)]
    candidates += [(dict(zip(values, combo)), fastest.num_warps, fastest.num_stages)
                   for combo in itertools.product(*values.values())]
    widened = types.SimpleNamespace(configs=list(configs))
    add_configs(widened, candidates)
    return widened.configs


def parse_values(items: list[str]) -> dict[str, list[int]]:
    """{"BV": [16]} from ["BV=16"]; a key given twice takes both lists."""
    values: dict[str, list[int]] = {}
    for item in items:
        key, sep, listed = item.partition("=")
        try:
            numbers = [int(v) for v in listed.split(",")] if sep and key else None
        except ValueError:
            numbers = None
        if not numbers:
            raise SystemExit(f"--add-values {item!r}: write KEY=V[,V], e.g. BV=16 or BK=16,32")
        values.setdefault(key.strip(), []).extend(numbers)
    return values


def _ms(value) -> float:
    return value[0] if isinstance(value, (list, tuple)) else value  # do_bench's (median, ...) or a float


def _ssd_case(cfg, batch: int, seq_len: int):
    import torch
    import torch.nn.functional as F

    from braid.kernels.ssd import mamba_ssm as ours

    modules = [sys.modules[f"mamba_ssm.ops.triton.{name}"] for name in
               ("ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_combined", "ssd_state_passing")]
    m = cfg.mamba2
    H, P, G, N = m.expand * cfg.d_model // m.head_dim, m.head_dim, m.n_groups, m.d_state
    kw = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(batch, seq_len, H, P, **kw)
    B, C = (torch.randn(batch, seq_len, G, N, **kw) for _ in range(2))
    dt = F.softplus(torch.randn(batch, seq_len, H, device="cuda") - 2).requires_grad_()
    A = (-torch.rand(H, device="cuda") * 4 - 0.5).requires_grad_()
    D = torch.randn(H, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)

    def fwd_bwd():
        ours.ssd_mamba_ssm(x, dt, A, B, C, chunk_size=m.chunk_size, D_H=D).backward(dy)

    return f"SSD B{batch} T{seq_len} H{H} P{P} G{G} N{N} chunk {m.chunk_size}", modules, fwd_bwd


def _gla_case(cfg, batch: int, seq_len: int):
    import fla.ops.common.chunk_h
    import fla.ops.gla.chunk
    import fla.ops.utils.cumsum
    import torch
    import torch.nn.functional as F

    from braid.kernels.gla import fla as ours

    modules = [fla.ops.common.chunk_h, fla.ops.gla.chunk, fla.ops.utils.cumsum]
    g_cfg = cfg.gla
    H = g_cfg.num_heads
    K, V = g_cfg.key_dim(cfg.d_model) // H, g_cfg.value_dim(cfg.d_model) // H
    kw = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k = (torch.randn(batch, seq_len, H, K, **kw) for _ in range(2))
    v = torch.randn(batch, seq_len, H, V, **kw)
    g = (F.logsigmoid(torch.randn(batch, seq_len, H, K, device="cuda")) / g_cfg.gate_logit_normalizer).requires_grad_()
    do = torch.randn_like(v)

    def fwd_bwd():
        ours.gla_fla(q, k, v, g).backward(do)

    return f"GLA B{batch} T{seq_len} H{H} K{K} V{V}", modules, fwd_bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernels", nargs="*", help="kernel names to sweep (default: every one the op ran)")
    parser.add_argument("--op", choices=("ssd", "gla"), required=True)
    parser.add_argument("--config", default="hybrid-374m")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--add-values", action="append", default=[], metavar="KEY=V[,V]",
                        help="block values to add to the combinations, e.g. BV=16 (repeatable)")
    args = parser.parse_args(argv)
    extra_values = parse_values(args.add_values)

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import resolve_config  # bench/throughput.py

    cfg = resolve_config(args.config, args.seq_len)
    shape, modules, fwd_bwd = (_ssd_case if args.op == "ssd" else _gla_case)(cfg, args.batch_size, args.seq_len)
    print(f"# {torch.cuda.get_device_name()}, {shape}, bf16; command: bench/autotune_sweep.py {' '.join(sys.argv[1:])}",
          flush=True)
    found = autotuners(modules)
    fwd_bwd()
    torch.cuda.synchronize()
    library = {}
    for name in args.kernels or sorted(found):
        kernel = found[name]
        timings = getattr(kernel, "configs_timings", None)
        if not kernel.cache or not timings:
            continue  # not run by this op, or a single config (nothing was timed)
        library[name] = {c: _ms(t) for c, t in timings.items()}
    for name, timings in library.items():
        kernel = found[name]
        warps = sorted({c.num_warps for c in kernel.configs}) if args.op == "gla" else (2, 4, 8)
        kernel.configs = widened_configs(kernel.configs, timings, warps=warps, extra_values=extra_values)
        kernel.cache = {}
        fwd_bwd()
        torch.cuda.synchronize()
        wide = {c: _ms(t) for c, t in kernel.configs_timings.items()}
        best, ours = min(timings.values()), min(wide, key=wide.get)
        print(f"{name}: library best {best * 1e3:.1f} us, widened best {wide[ours] * 1e3:.1f} us "
              f"({(best - wide[ours]) / best:+.1%}) over {len(wide)} configs: {ours}", flush=True)


if __name__ == "__main__":
    main()
