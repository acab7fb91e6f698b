#!/usr/bin/env bash
# The GPU suite: parity tests, throughput, kernel benchmarks, on one GPU; a short summary
# table is printed last. Run from the repository root on the device machine:
#
#     source .whl/activate && bash bench/gpu_suite.sh
#
# Every stage is time-boxed (`timeout`) and the suite goes on when one fails or times out;
# the whole suite stops starting stages after SUITE_S seconds (530). Logs go to $OUT/*.log,
# JSON rows to $OUT/*.jsonl, autotune results to $OUT/triton-autotune.tgz (8 files in all).
# Stages in order, with their limits in s:
#
#     tests              pytest -m gpu tests/gpu tests/train/test_gpu.py        T_TESTS   (240)
#     throughput_llama   llama-374m (LLAMA_COMPILE modes, step-graph) vs the HF   T_LLAMA   (120)
#                        peer (PEER_MODES, compiled), seq 2048
#     kernels            bench/kernels.py, sections KERNELS_ONLY (all)           T_KERNELS (100)
#     throughput_hybrid  hybrid-374m once per BRAID_KERNELS spec in HYBRID_KERNELS T_HYBRID (300) each,
#                        (HYBRID_COMPILE modes: block-graph step-graph), seq 8192; the first run
#                        also trains llama-374m (LLAMA8K_COMPILE, step-graph: its fastest mode)
#                        and prints the hybrid/llama ratios
#     blocks             bench/blocks.py: GPU time per sublayer kind of hybrid-374m  T_BLOCKS (150)
#                        and llama-374m at seq 8192 (not in the default STAGES)
#
# fla autotunes each kernel shape on its first call on a machine (minutes for GLA and SSD,
# shared by the hybrid and the kernel benchmarks); the results persist in TRITON_CACHE_DIR
# for the machine's life, so what a first call left unfinished is fast on a second call
# on the same warm machine:
#
#     STAGES="throughput_hybrid kernels" KERNELS_ONLY=conv,gla,ssd T_KERNELS=240 bash bench/gpu_suite.sh
#
# Autotune results also travel between machines: the suite writes the chosen configs
# (*.autotune.json, a few KB) to $OUT/triton-autotune.tgz, and unpacks AUTOTUNE_TGZ (that file,
# carried into the next call) first, so a fresh machine compiles only the winners. Its default,
# bench/autotune/h200-triton-3.6.tgz, holds the picks of an H200 with Triton 3.6 for the
# benchmarks' shapes (2026-11-29; without it fla and mamba_ssm tune for minutes on a fresh
# machine: its first hybrid-374m run took 278 s with warm-up, where a run with these picks took
# 103 s, though that first run also compiled FlexAttention). Triton keys each entry by its
# kernel's source, the Triton version, the GPU target and the config list, so on anything else
# an entry is never read, and the autotuner tunes as usual.
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
STAGES="${STAGES:-tests throughput_llama kernels throughput_hybrid}"
SUITE_S="${SUITE_S:-530}"
export FLA_CACHE_RESULTS=1 TRITON_CACHE_AUTOTUNING=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
mkdir -p "$TRITON_CACHE_DIR"
AUTOTUNE_TGZ="${AUTOTUNE_TGZ-bench/autotune/h200-triton-3.6.tgz}"
if [ -n "$AUTOTUNE_TGZ" ] && [ -f "$AUTOTUNE_TGZ" ]; then tar -xzf "$AUTOTUNE_TGZ" -C "$TRITON_CACHE_DIR"; fi
export PYTHONUNBUFFERED=1
suite_start=$(date +%s)
status_lines=()

stage() {  # stage NAME LIMIT_S LOG COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    local start rc took verdict left
    left=$(( SUITE_S - ($(date +%s) - suite_start) ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then
        status_lines+=("$(printf '%-18s %-14s %5ss  (%s)' "$name" "NOT RUN" 0 "suite time spent")")
        return
    fi
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED rc=$rc"
    fi
    echo "=== $name: $verdict after ${took}s" | tee -a "$OUT/$log"
    status_lines+=("$(printf '%-18s %-14s %5ss  (%s)' "$name" "$verdict" "$took" "$log")")
}

{
    nvidia-smi -L
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
    python3 -m braid.cli kernels
} >"$OUT/env.log" 2>&1

for name in $STAGES; do
    case "$name" in
    tests)
        stage tests "${T_TESTS:-240}" tests.log \
            python3 -m pytest -m gpu tests/gpu tests/train/test_gpu.py -v --tb=short -rfEs -p no:cacheprovider ;;
    throughput_llama)
        stage throughput_llama "${T_LLAMA:-120}" throughput.log \
            python3 bench/throughput.py --config llama-374m --seq-len 2048 --batch-size 8 --steps 10 --warmup 3 \
            --compile ${LLAMA_COMPILE:-step-graph} --peer --peer-modes ${PEER_MODES:-compiled} \
            --out "$OUT/throughput.jsonl" ;;
    kernels)
        limit="${T_KERNELS:-100}"
        stage kernels "$limit" kernels.log \
            python3 bench/kernels.py --budget-s $(( limit * 3 / 4 )) ${KERNELS_ONLY:+--only "$KERNELS_ONLY"} \
            --out "$OUT/kernels.jsonl" ;;
    throughput_hybrid)
        # The first spec's run also trains llama-374m in the same process: the target is their ratio.
        baseline=(--baseline llama-374m --baseline-compile ${LLAMA8K_COMPILE:-step-graph})
        for spec in ${HYBRID_KERNELS:-auto}; do
            stage throughput_hybrid "${T_HYBRID:-300}" throughput.log \
                python3 bench/throughput.py --config hybrid-374m --seq-len 8192 --batch-size 2 --steps 10 --warmup 3 \
                --compile ${HYBRID_COMPILE:-block-graph step-graph} --no-peer --kernels "$spec" "${baseline[@]}" \
                --out "$OUT/throughput.jsonl"
            baseline=()
        done ;;
    blocks)
        for config in hybrid-374m llama-374m; do
            stage blocks "${T_BLOCKS:-150}" blocks.log \
                python3 bench/blocks.py --config $config --seq-len 8192 --batch-size 2
        done ;;
    *)
        echo "unknown stage $name (stages: tests throughput_llama kernels throughput_hybrid blocks)" ;;
    esac
done

(cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar -czf "$OUT/triton-autotune.tgz" -T -)

body=$(python3 - "$OUT" 2>&1 <<'PY'
import json
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])


def rows(name):
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


print("throughput (MFU = flops/token * tokens/s / 989 TFLOP/s)")
for r in rows("throughput.jsonl"):
    print(f"  {r['name']:38s} seq {r['seq_len']:5d} x{r['batch_size']}  {r['tokens_per_s'] / 1e3:7.1f}k tok/s  "
          f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_mem_gib']} GiB  [{r['card']}]")


def best(config, seq_len, model="braid"):
    found = [r["tokens_per_s"] for r in rows("throughput.jsonl")
             if r.get("config") == config and r["seq_len"] == seq_len and r.get("model") == model]
    return max(found, default=None)


for (num, den, seq, target) in (
    (("llama-374m", "braid"), ("llama-374m-peer", "hf-llama"), 2048, 1.3),
    (("hybrid-374m", "braid"), ("llama-374m", "braid"), 8192, 1.3),
):
    a, b = best(num[0], seq, num[1]), best(den[0], seq, den[1])
    if a and b:
        print(f"  fastest {num[0]} / fastest {den[0]} at seq {seq}: {a / b:.3f}x (target >= {target}x)")
kernels = rows("kernels.jsonl")
if kernels:
    print("kernels (forward + backward)")
    for r in kernels:
        rate = f"{r['tflops']} TFLOP/s" if r.get("tflops") is not None else (f"{r['gbs']} GB/s" if r.get("gbs") else "")
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f} ms"
        print(f"  {r['op']:10s} {r['variant']:30s} {ms:>11s}  {rate:16s} {r['note'][:60]}")
    by = {(r["op"], r["variant"]): r["ms"] for r in kernels}
    full = by.get(("attention", "full: sdpa (cuDNN)"))
    for name in ("cudnn", "flex", "torch flash", "flash-attn"):
        slide = by.get(("attention", f"window 1024: {name}"))
        if full and slide:
            print(f"  sliding 1024 ({name}) vs full causal (SDPA) at T=8192: {full / slide:.2f}x (target >= 3x)")
    fla, mamba = by.get(("ssd", "fla chunk_simple_gla")), by.get(("ssd", "mamba_ssm chunk_scan (128)"))
    if fla and mamba:
        print(f"  SSD fla {fla:.2f} ms vs mamba_ssm {mamba:.2f} ms: faster = {'fla' if fla <= mamba else 'mamba_ssm'}")
tests = out / "tests.log"
if tests.exists():
    ends = [line for line in tests.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b.* in ", line)]
    print("tests: " + (ends[-1].strip("= ") if ends else "no pytest summary (timed out?)"))
PY
)
{
    echo "================ braid GPU suite summary ($(( $(date +%s) - suite_start ))s) ================"
    printf '%s\n' "${status_lines[@]}"
    echo "$body"
} | tee "$OUT/summary.txt"
