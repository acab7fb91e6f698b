"""Training throughput of a braid config and of the HF Llama peer, on one GPU, in one process.

    python bench/throughput.py --config llama-374m --seq-len 2048 --batch-size 8 --steps 20 \
        --compile none block --peer --out runs.jsonl

Every run trains `--steps` timed steps (after `--warmup` untimed ones, which include any
compilation) on one fixed batch of random tokens: bf16 autocast over fp32 master weights,
fused AdamW. braid computes its loss with braid.kernels.cross_entropy.linear_cross_entropy
on `model(..., return_hidden=True)` and `model.head_weight` (no full logits), plus the MoE
auxiliary losses; `--compile block` compiles each block (torch.compile per Block), `model`
the whole decoder; `step` compiles the decoder, head and loss as one function (plain
F.cross_entropy on the logits, which inductor fuses; the logits then exist, in bf16),
`step-cg` the same with CUDA graphs (mode="reduce-overhead"). `graph`, `block-graph` and
`step-graph` capture the whole step (forward, backward and a capturable fused AdamW) as one
CUDA graph (braid.train.cuda_graph.GraphedStep) over eager, per-block compiled or
step-compiled code; they use the plain logits loss (liger's fused loss reads a count back to
the host, which a graph cannot hold) and autocast without its weight-cast cache. The peer is HF transformers' LlamaForCausalLM built (no download) from a
LlamaConfig of llama-374m's shape (vocab 32000, hidden 1024, 24 layers, 16 heads, FFN 2816),
SDPA attention, its own loss; eager and torch.compile'd.

MFU = flops_per_token * tokens/s / 989 TFLOP/s (H100/H200 SXM dense bf16 peak). braid's
flops_per_token is braid.model.flops_per_token(cfg, seq_len) (6 per parameter-multiply plus
the mixers' sequence work, attention counting the causal half); the peer's is
6 * N + 6 * L * h * S with N its non-embedding parameters including the head, L layers,
h hidden size, S sequence length (the formula of shared/device/README.md).

Each run prints one line and appends one JSON row (card, date, command, tokens/s, MFU, peak
memory, ...) to `--out`. `--baseline CONFIG` trains a second braid config in the same process
(the hybrid's target is a ratio to llama-374m at the same sequence length), and the last lines
give each braid run's ratio to the fastest baseline and the fastest peer run of the call:

    python bench/throughput.py --config hybrid-374m --seq-len 8192 --batch-size 2 --compile block-graph \
        step-graph --baseline llama-374m --baseline-compile step-graph --no-peer
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from braid.configs import MODEL_CONFIGS
from braid.configs.bench import BENCH_CONFIGS
from braid.kernels.backend import current_spec, probe_all, report, use_backends
from braid.kernels.cross_entropy import linear_cross_entropy
from braid.model import ModelConfig, build_model, flops_per_token, num_params
from braid.train.config import apply_overrides
from braid.train.cuda_graph import GraphedStep

PEAK_BF16_FLOPS = 989e12
COMPILE_MODES = ("none", "block", "model", "step", "step-cg", "graph", "block-graph", "step-graph")


@dataclass
class Run:
    """What one timed run measured."""

    name: str
    step_seconds: list[float]
    tokens_per_step: int
    flops_per_token: float
    peak_mem_gib: float | None
    losses: list[float]
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)

    @property
    def mfu(self) -> float:
        return self.flops_per_token * self.tokens_per_s / PEAK_BF16_FLOPS

    def row(self, args: argparse.Namespace) -> dict:
        return {
            "name": self.name,
            "card": card_name(args.device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, *sys.argv]),
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "steps": len(self.step_seconds),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "mfu": round(self.mfu, 4),
            "flops_per_token": self.flops_per_token,
            "step_ms_median": round(1e3 * statistics.median(self.step_seconds), 2),
            "peak_mem_gib": None if self.peak_mem_gib is None else round(self.peak_mem_gib, 2),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            **self.extra,
        }


def resolve_config(name: str, seq_len: int, overrides: list[str] | None = None) -> ModelConfig:
    """A named config (MODEL_CONFIGS or the benchmark configs) with `dotted.key=value` overrides
    (e.g. mamba2.chunk_size=256) and a context of at least seq_len."""
    configs = {**BENCH_CONFIGS, **MODEL_CONFIGS}
    if name not in configs:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(configs))}")
    cfg = apply_overrides(configs[name](), overrides or [])
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, seq_len))


def random_batch(vocab_size: int, batch_size: int, seq_len: int, doc_len: int, device: str, seed: int = 0):
    """tokens_BT, labels_BT and doc ids (None when doc_len is 0: one document per row)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen, device=device)
    doc_ids = None
    if doc_len > 0:
        starts_BT = torch.rand(batch_size, seq_len, generator=gen, device=device) < 1.0 / doc_len
        starts_BT[:, 0] = True
        doc_ids = starts_BT.cumsum(dim=1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), doc_ids


def timed_steps(step, warmup: int, steps: int, device: str) -> tuple[list[float], list[float]]:
    """Run warmup then timed steps; returns seconds per timed step and every step's loss."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses = [step() for _ in range(warmup)]
    sync()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds, [float(loss) for loss in losses]


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def card_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def fused_adamw(model: torch.nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True, capturable=capturable)


def apply_compile(model, mode: str, inductor_mode: str | None = None):
    if mode == "block":
        for block in model.layers.values():
            block.compile(mode=inductor_mode)
    elif mode == "model":
        model = torch.compile(model, mode=inductor_mode)
    return model


def run_braid(args: argparse.Namespace, compile_mode: str) -> Run:
    cfg = resolve_config(args.config, args.seq_len, args.set)
    probe_all()  # import the kernel backends before dynamo traces the calls into them
    graphed = compile_mode.endswith("graph")
    base_mode = {"graph": "none", "block-graph": "block", "step-graph": "step"}.get(compile_mode, compile_mode)
    decoder = build_model(cfg, device=args.device, seed=0).train()
    optimizer = fused_adamw(decoder, capturable=graphed)
    model = apply_compile(decoder, base_mode, args.inductor_mode)
    tokens_BT, labels_BT, doc_ids_BT = random_batch(
        cfg.vocab_size, args.batch_size, args.seq_len, args.doc_len, args.device
    )

    def fused_loss(tokens, labels, doc_ids) -> torch.Tensor:
        hidden_BTD, aux = model(tokens, doc_ids, return_aux=True, return_hidden=True)
        loss = linear_cross_entropy(hidden_BTD.flatten(0, 1), decoder.head_weight, labels.flatten())
        return loss + sum(aux.values())

    def plain_loss(tokens, labels, doc_ids) -> torch.Tensor:
        hidden_BTD, aux = model(tokens, doc_ids, return_aux=True, return_hidden=True)
        logits_NV = hidden_BTD.flatten(0, 1) @ decoder.head_weight.t()
        return torch.nn.functional.cross_entropy(logits_NV.float(), labels.flatten()) + sum(aux.values())

    loss_fn = plain_loss if graphed else fused_loss
    if base_mode in ("step", "step-cg"):
        loss_fn = torch.compile(plain_loss, mode="reduce-overhead" if base_mode == "step-cg" else args.inductor_mode)

    def eager_step(tokens, labels, doc_ids) -> torch.Tensor:
        if compile_mode == "step-cg":  # a new step: CUDA graph outputs of the last one may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(args.device, dtype=torch.bfloat16, cache_enabled=not graphed):
            loss = loss_fn(tokens, labels, doc_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak_memory(args.device)  # peak memory includes warm-up (and a graph's capture)
    if graphed:
        graph_step = GraphedStep(eager_step, tokens_BT, labels_BT, doc_ids_BT, warmup=args.warmup)

        def step() -> torch.Tensor:
            return graph_step(tokens_BT, labels_BT, None if doc_ids_BT is None else doc_ids_BT.clone())

    else:

        def step() -> torch.Tensor:
            # A fresh doc ids tensor per step, as a new batch would be (no cached segments or masks).
            doc_ids = None if doc_ids_BT is None else doc_ids_BT.clone()
            return eager_step(tokens_BT, labels_BT, doc_ids).clone()  # kept past the step

    seconds, losses = timed_steps(step, args.warmup, args.steps, args.device)
    if args.profile or args.trace:
        # One trace per compile mode when several run: name.json.gz -> name.<mode>.json.gz
        trace = args.trace and (args.trace if len(args.compile) == 1 else args.trace.replace(".json", f".{compile_mode}.json"))
        print_profile(step, args.device, rows=args.profile_rows, trace=trace)
    if args.sync_debug and not graphed:
        print_syncs(step)
    return Run(
        name=f"braid {args.config}{''.join(f' {o}' for o in args.set)} compile={compile_mode}" + ("" if current_spec() == "auto" else f" [{current_spec()}]"),
        step_seconds=seconds,
        tokens_per_step=args.batch_size * args.seq_len,
        flops_per_token=flops_per_token(cfg, args.seq_len),
        peak_mem_gib=peak_memory_gib(args.device),
        losses=losses,
        extra={
            "model": "braid",
            "config": args.config,
            "compile": compile_mode,
            "inductor_mode": args.inductor_mode,
            "kernels": current_spec(),
            "doc_len": args.doc_len,
            "params": num_params(cfg),
        },
    )


def print_syncs(step, depth: int = 14) -> None:
    """One more step with CUDA sync debugging on: each place that makes the host wait for the
    GPU (.item(), .tolist(), .cpu(), data-dependent shapes), with its Python stack and count.
    A step with none can run ahead of the GPU and be captured as a CUDA graph."""
    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = "".join(traceback.format_stack(limit=depth)[:-2])
            sites[stack] = sites.get(stack, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"# sync check: {sum(sites.values())} synchronizing calls in one step, at {len(sites)} places")
    for stack, count in sorted(sites.items(), key=lambda item: -item[1]):
        print(f"## {count}x\n{stack}")


def print_profile(step, device: str, rows: int = 25, trace: str | None = None) -> None:
    """One more step under torch.profiler: the kernels that took the most device time; with
    `trace`, a Chrome trace with Python frames (gzipped when the name ends in .gz; read it with
    bench/trace_summary.py, which ties each kernel to the source line that launched it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, with_stack=trace is not None) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70), flush=True)
    if trace:
        prof.export_chrome_trace(trace)


def llama_peer(seq_len: int, device: str):
    """HF LlamaForCausalLM of llama-374m's shape, float32 parameters, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        return LlamaForCausalLM(config), config


def run_peer(args: argparse.Namespace, compiled: bool) -> Run:
    model, config = llama_peer(args.seq_len, args.device)
    model.train()
    optimizer = fused_adamw(model)
    non_embedding = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    L, h, S = config.num_hidden_layers, config.hidden_size, args.seq_len
    forward = torch.compile(model, mode=args.inductor_mode) if compiled else model  # braid's compile mode
    tokens_BT, _, _ = random_batch(config.vocab_size, args.batch_size, args.seq_len, 0, args.device)

    def step() -> torch.Tensor:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = forward(input_ids=tokens_BT, labels=tokens_BT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak_memory(args.device)
    seconds, losses = timed_steps(step, args.warmup, args.steps, args.device)
    return Run(
        name=f"HF Llama peer {'compiled' if compiled else 'eager'}" + (f" [{args.inductor_mode}]" if compiled and args.inductor_mode else ""),
        step_seconds=seconds,
        tokens_per_step=args.batch_size * args.seq_len,
        flops_per_token=6 * non_embedding + 6 * L * h * S,
        peak_mem_gib=peak_memory_gib(args.device),
        losses=losses,
        extra={"model": "hf-llama", "config": "llama-374m-peer", "compile": "model" if compiled else "none",
               "inductor_mode": args.inductor_mode},
    )


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama-374m", help="braid model config (MODEL_CONFIGS or hybrid-374m)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the braid config (not the baseline's), e.g. mamba2.chunk_size=256; repeatable")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument(
        "--compile", nargs="+", choices=COMPILE_MODES, default=["none"], help="braid runs, one per mode"
    )
    parser.add_argument(
        "--inductor-mode", default=None, choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of braid's compiled modes and the compiled peer (step-cg keeps reduce-overhead); max-autotune "
        "also tunes inductor's GEMM and attention templates (minutes of compilation)",
    )
    parser.add_argument("--braid", action=argparse.BooleanOptionalAction, default=True, help="run braid")
    parser.add_argument(
        "--baseline", default=None,
        help="another braid config trained in the same run (same seq, batch, steps), e.g. llama-374m beside "
        "hybrid-374m; the ratios to its fastest mode are printed last",
    )
    parser.add_argument("--baseline-compile", nargs="+", choices=COMPILE_MODES, default=None,
                        help="the baseline's compile modes (default: --compile's)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="run the HF Llama peer")
    parser.add_argument("--peer-modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--doc-len", type=int, default=0, help="mean packed-document length (0: none)")
    parser.add_argument("--kernels", default=None, help="a BRAID_KERNELS spec for the braid runs, e.g. reference")
    parser.add_argument("--out", default=None, help="append one JSON row per run to this file")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one more braid step")
    parser.add_argument("--profile-rows", type=int, default=25, help="kernels --profile lists")
    parser.add_argument("--trace", default=None, help="write a Chrome trace of one more braid step here (.json[.gz])")
    parser.add_argument(
        "--sync-debug", action="store_true", help="list the host-device synchronisations of one more eager braid step"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/throughput.py: no CUDA device (pass --device cpu for a smoke test)")
    jobs = []  # (role, run) pairs: braid, baseline (another braid config), peer
    if args.braid:
        jobs += [("braid", lambda mode=mode: run_braid(args, mode)) for mode in args.compile]
    if args.baseline:
        baseline_args = argparse.Namespace(**{**vars(args), "config": args.baseline, "set": [], "trace": None})
        jobs += [
            ("baseline", lambda mode=mode: run_braid(baseline_args, mode))
            for mode in (args.baseline_compile or args.compile)
        ]
    if args.peer:
        jobs += [("peer", lambda mode=mode: run_peer(args, mode == "compiled")) for mode in args.peer_modes]
    measured: dict[str, list[tuple[str, float]]] = {"braid": [], "baseline": [], "peer": []}
    kernels = use_backends(args.kernels) if args.kernels else contextlib.nullcontext()
    with kernels:
        print(f"# {card_name(args.device)}, seq {args.seq_len}, batch {args.batch_size}, kernels {current_spec()}")
        if args.device == "cuda":  # a backend missing on this machine changes what is measured: say so
            print("\n".join(f"#   {line}" for line in report()), flush=True)
        for role, job in jobs:
            started = time.time()
            try:
                run = job()
            except Exception as error:  # report and go on with the other runs of this call
                print(f"FAILED: {type(error).__name__}: {error}"[:2000], flush=True)
                traceback.print_exc(limit=-8)
                release_memory()
                continue
            row = run.row(args)
            print(
                f"{run.name:40s} {run.tokens_per_s / 1e3:8.1f}k tok/s  MFU {100 * run.mfu:5.1f}%  "
                f"peak {row['peak_mem_gib']} GiB  step {row['step_ms_median']:.0f} ms  "
                f"loss {run.losses[0]:.3f}->{run.losses[-1]:.3f}  ({time.time() - started:.0f} s with warm-up)",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            measured[role].append((run.name, run.tokens_per_s))
            del run
            release_memory()
    for line in ratio_lines(measured):
        print(line)


def ratio_lines(measured: dict[str, list[tuple[str, float]]]) -> list[str]:
    """Each braid run's tokens/s over the fastest baseline and the fastest peer run of this call."""
    lines = []
    for role in ("baseline", "peer"):
        if not measured[role] or not measured["braid"]:
            continue
        best_name, best = max(measured[role], key=lambda item: item[1])
        for name, tokens_per_s in measured["braid"]:
            lines.append(f"ratio: {name} / {best_name} (fastest {role} of this run) = {tokens_per_s / best:.3f}x")
    return lines


if __name__ == "__main__":
    main()
