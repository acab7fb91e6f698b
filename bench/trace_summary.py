"""Where a step's GPU time goes: a Chrome trace from `bench/throughput.py --trace` (which
records Python frames) summed by kernel kind, by the braid source line that launched each
kernel (forward) or the autograd node that ran it (backward), and by kernel name.

    python3 bench/trace_summary.py trace.json.gz [--rows 30]

Each kernel is tied to its launch (the CUDA runtime call with the same correlation id), the
launch to the CPU op around it (the aten op), the outermost autograd node around it and the
innermost Python frame under braid/ around it, on the launching thread.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

KINDS = (  # (kind, pattern on the kernel name), first match wins
    # before matmul: cuDNN's flash kernels are named ..._sdpa_..._wgmma_...
    ("attention", r"fmha|flash|attn|sdpa|cudnn::fusion"),
    ("matmul", r"gemm|nvjet|cutlass|sm90_xmma|wgmma|_grouped_mm|cublas"),
    # torch.compile's generated kernels (pointwise, reductions, templates): named by what they fuse
    ("inductor", r"^triton_(poi|per|red|tem)_"),
    ("copy/cast", r"copy|Memcpy|cast|convert"),
    ("reduce", r"reduce|sum_|norm|softmax"),
    ("optimizer", r"adam|multi_tensor"),
    ("triton", r"^triton|_kernel$"),  # libraries' Triton kernels (fla, mamba_ssm, liger, braid's)
    ("elementwise", r"elementwise|vectorized|unrolled"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def stacks_at(spans: list[dict], points: list[float]) -> list[list[dict]]:
    """For each time in `points` (sorted), the spans of one thread around it, outermost first.
    Spans on one thread nest, so one sweep with a stack finds them."""
    spans = sorted(spans, key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack, out, i = [], [], 0
    for ts in points:
        while i < len(spans) and spans[i]["ts"] <= ts:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < spans[i]["ts"]:
                stack.pop()
            stack.append(spans[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < ts:
            stack.pop()
        out.append(list(stack))
    return out


def summarize(events: list[dict], rows: int) -> list[str]:
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    spans, points = defaultdict(list), defaultdict(set)  # per (pid, tid): cpu ops and python frames; launch times
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function") and e.get("ph") == "X":
            spans[(e["pid"], e["tid"])].append(e)
    for launch in launches.values():
        points[(launch["pid"], launch["tid"])].add(launch["ts"])
    around_launch = {}
    for key, times in points.items():
        times = sorted(times)
        for ts, stack in zip(times, stacks_at(spans.get(key, []), times)):
            around_launch[(key, ts)] = stack

    total = sum(k.get("dur", 0) for k in kernels)
    by_kind, by_site, by_node, by_name = (defaultdict(float) for _ in range(4))
    for k in kernels:
        dur = k.get("dur", 0)
        by_kind[kind_of(k["name"])] += dur
        by_name[k["name"][:90]] += dur
        launch = launches.get(k.get("args", {}).get("correlation"))
        around = around_launch[((launch["pid"], launch["tid"]), launch["ts"])] if launch else []
        ops = [e["name"] for e in around if e.get("cat") == "cpu_op"]
        nodes = [n for n in ops if n.startswith("autograd::engine::evaluate_function: ")]
        frames = [e["name"] for e in around if e.get("cat") == "python_function" and "braid/" in e["name"]]
        aten = next((n for n in reversed(ops) if n.startswith("aten::")), ops[-1] if ops else "?")
        if nodes:
            by_node[nodes[0].split(": ", 1)[1] + " / " + aten] += dur
        else:
            by_site[(frames[-1].split("braid/", 1)[1] if frames else "(no braid frame)") + " / " + aten] += dur

    def table(title: str, sums: dict, n: int) -> list[str]:
        out = [f"\n## {title}", f"{'ms':>9s} {'%':>6s}  what"]
        for what, dur in sorted(sums.items(), key=lambda kv: -kv[1])[:n]:
            out.append(f"{dur / 1e3:9.3f} {100 * dur / max(total, 1):6.2f}  {what}")
        return out

    lines = [f"# GPU kernel time {total / 1e3:.3f} ms in {len(kernels)} kernels"]
    lines += table("by kernel kind", by_kind, len(by_kind))
    lines += table("forward: by braid source line / aten op", by_site, rows)
    lines += table("backward: by autograd node / aten op", by_node, rows)
    lines += table("by kernel name", by_name, rows)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    print("\n".join(summarize(load(args.trace), args.rows)))


if __name__ == "__main__":
    main()
