#!/usr/bin/env bash
# Multi-GPU layout proof: `braid train` of one model for a few bf16 steps at every layout the
# visible GPUs allow, each under torchrun with a time box, then a table (bench/parallel_summary.py):
# layout, max |loss - 1 GPU loss| over the first 10 steps, median step time, tokens/s and peak
# memory (rank 0's GPU). Run from the repository root on a 2-GPU (or 4/8-GPU) machine:
#
#     source .whl/activate && PYTHONPATH=src bash bench/parallel_gpu.sh
#
# Data: DATA (default data/gutenberg) must hold MDS shards made by `braid data prepare` (the
# demo's Gutenberg shards with their 4096-token tokenizer: run `braid demo` or
# `braid data corpus gutenberg` + `braid data tokenizer` + `braid data prepare` on a machine
# with the package index, and carry the directory; the GPU machine has no network).
#
# Layouts (name:processes:overrides), run when enough GPUs are visible:
#     1gpu:1  1gpu_dp2:1  tp2:2  pp2:2  dp2_fsdp2:2 (ZeRO-3)  dp2_deepspeed:2 (ZeRO-2)
#     pp2_deepspeed:2 (ZeRO-1 over pipeline stages)  ep2:2 (dp_shard=2)
#     tp2_ep2:2  tp2_pp2:4  tp2_pp2_ep2:4  tp2_pp2_dp2_ep2:8
# The global batch is GLOBAL_BATCH rows of SEQ tokens at every layout (data.batch_size is
# GLOBAL_BATCH / dp per rank). tp and pp layouts read exactly the 1gpu run's batches; layouts
# with 2 data-parallel ranks read what 1gpu_dp2 reads (one GPU, data.read_as_dp=2: the two
# ranks' rows stacked), so every loss difference in the table is rounding (bf16).
#
# Embeddings are untied at every layout (pipeline stages need it). Environment: MODEL (hybrid-100m), DEVICE (cuda; cpu tests the script on gloo), STEPS (30),
# SEQ (1024), GLOBAL_BATCH (8), LR (1e-3), T_LAYOUT (300 s per layout), LAYOUTS (names to run;
# default all that fit), NGPU (default: nvidia-smi's count; on cpu 2), OUT (bench_out/parallel).
# CPU check of the script itself:
#     DEVICE=cpu MODEL=tiny-hybrid SEQ=128 STEPS=6 LAYOUTS="1gpu tp2 dp2_fsdp2 ep2 tp2_ep2" bash bench/parallel_gpu.sh
set -u
MODEL="${MODEL:-hybrid-100m}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-30}"
SEQ="${SEQ:-1024}"
GLOBAL_BATCH="${GLOBAL_BATCH:-8}"
LR="${LR:-1e-3}"
T_LAYOUT="${T_LAYOUT:-300}"
DATA="${DATA:-data/gutenberg}"
OUT="${OUT:-bench_out/parallel}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
export FLA_CACHE_RESULTS=1
mkdir -p "$OUT"

if [ -z "${NGPU:-}" ]; then
    if [ "$DEVICE" = "cpu" ]; then NGPU=2; else NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); fi
fi
if [ ! -f "$DATA/tokenizer.json" ]; then
    echo "no prepared data in $DATA (tokenizer.json missing): prepare it where the package index is" \
         "reachable (braid demo, or braid data corpus/tokenizer/prepare) and carry the directory" >&2
    exit 2
fi

ALL_LAYOUTS=(
    "1gpu:1:"
    "1gpu_dp2:1:data.read_as_dp=2"
    "tp2:2:parallel.tp=2"
    "pp2:2:parallel.pp=2"
    "dp2_fsdp2:2:parallel.dp_shard=2 parallel.zero_stage=3"
    "dp2_deepspeed:2:parallel.dp_shard=2 parallel.zero_engine=deepspeed parallel.zero_stage=2"
    "pp2_deepspeed:2:parallel.pp=2 parallel.zero_engine=deepspeed parallel.zero_stage=1"
    "ep2:2:parallel.dp_shard=2 parallel.ep=2"
    "tp2_ep2:2:parallel.tp=2 parallel.ep=2"
    "tp2_pp2:4:parallel.tp=2 parallel.pp=2"
    "tp2_pp2_ep2:4:parallel.tp=2 parallel.pp=2 parallel.ep=2"
    "tp2_pp2_dp2_ep2:8:parallel.tp=2 parallel.pp=2 parallel.dp_shard=2 parallel.ep=2"
)

# One YAML for every layout: the tiny-hybrid training settings with MODEL's model.
"$PY" - "$MODEL" "$SEQ" "$OUT/train.yaml" <<'PY' || exit 2
import dataclasses
import sys

from braid.configs import model_config
from braid.configs.train import train_config
from braid.train.config import save_config

name, seq, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = train_config("tiny-hybrid")
cfg = dataclasses.replace(cfg, name=f"parallel-{name}", model=model_config(name).replace(max_seq_len=seq))
save_config(cfg, path)
PY

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
    echo "MODEL=$MODEL DEVICE=$DEVICE STEPS=$STEPS SEQ=$SEQ GLOBAL_BATCH=$GLOBAL_BATCH NGPU=$NGPU"
} | tee "$OUT/env.log"

dtype=bfloat16
threads=0
if [ "$DEVICE" = "cpu" ]; then dtype=float32; threads=1; fi
: >"$OUT/layouts.tsv"
for entry in "${ALL_LAYOUTS[@]}"; do
    IFS=: read -r name nproc overrides <<<"$entry"
    if [ -n "${LAYOUTS:-}" ] && [[ " $LAYOUTS " != *" $name "* ]]; then continue; fi
    if [ "$nproc" -gt "$NGPU" ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$nproc" "SKIPPED (needs $nproc GPUs)" 0 "" >>"$OUT/layouts.tsv"
        continue
    fi
    tp=1; pp=1
    [[ "$overrides" =~ parallel\.tp=([0-9]+) ]] && tp=${BASH_REMATCH[1]}
    [[ "$overrides" =~ parallel\.pp=([0-9]+) ]] && pp=${BASH_REMATCH[1]}
    dp=$(( nproc / (tp * pp) ))
    run="$OUT/$name"
    rm -rf "$run"
    args=(train "$OUT/train.yaml" $overrides "data.path=$DATA" "data.seq_len=$SEQ"
          "data.batch_size=$(( GLOBAL_BATCH / dp ))" "train.steps=$STEPS" "train.device=$DEVICE" "model.tie_embeddings=false"
          "train.dtype=$dtype" "train.cpu_threads=$threads" "optim.lr=$LR" "schedule.warmup_steps=5"
          "log.every=1" "log.progress=false" "log.sample_every=0" "checkpoint.every=0" "eval.every=0"
          "eval.batches=1" --out "$run")
    if [ "$nproc" -eq 1 ]; then
        cmd=("$PY" -m braid.cli "${args[@]}")
    else
        cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m braid.cli "${args[@]}")
    fi
    echo "=== $name: ${cmd[*]}" | tee "$OUT/$name.log"
    start=$(date +%s)
    timeout --kill-after=15 "$T_LAYOUT" "${cmd[@]}" >>"$OUT/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT"; elif [ "$rc" -ne 0 ]; then status="FAILED rc=$rc"; fi
    echo "=== $name: $status after ${took}s" | tee -a "$OUT/$name.log"
    if [ "$status" != ok ]; then tail -n 5 "$OUT/$name.log"; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$nproc" "$status" "$took" "${cmd[*]}" >>"$OUT/layouts.tsv"
done

"$PY" bench/parallel_summary.py "$OUT" | tee "$OUT/summary.md"
