#!/usr/bin/env bash
# MOHAWK proof: distill SmolLM2-135M-Instruct (GGUF) into an all-Mamba-2 student of its shape
# on the embedded Gutenberg corpus, train the same shape from scratch on as many tokens, and
# compare held-out perplexities. Run from the repository root (one H200: about 4.5 minutes of
# distillation, 3 of scratch training and 1 of evaluation; SCRATCH_GPU=1 trains the control on a
# second GPU at the same time):
#
#     GGUF_PARTS="smol.gguf.part0 smol.gguf.part1" OUT=$OUT bash bench/distill_smollm2.sh
#     GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf SCRATCH_GPU=1 bash bench/distill_smollm2.sh
#
# Needs: braid importable (installed, or run from the repo root: src/ is put on PYTHONPATH),
# transformers, gguf and accelerate; DATA made by `braid data prepare` with the teacher's
# tokenizer (docs/distill.md). Checkpoints (GBs) and the joined GGUF go to WORK
# (/tmp/distill_smollm2), never to OUT, which gets only logs, metrics.jsonl files, the scratch
# config, results.json and table.md. Steps, each time-boxed with `timeout`, logs in $OUT/*.log:
#
#     distill   braid distill --stages 1,2,3 --tokens TOKENS1,TOKENS2,TOKENS3     T_DISTILL (270)
#     scratch   braid train, the student's config from scratch, SCRATCH_TOKENS    T_SCRATCH (150)
#     evaluate  teacher, student at init, after stages 1-3, scratch: val loss     T_EVAL    (100)
#
# "Same tokens": the scratch student trains on TOKENS1+TOKENS2+TOKENS3 tokens (the sum of
# the three stages' budgets, same seq len and batch size, same data), as many as the
# distilled student saw in all of its training. Knobs (env): DEVICE (cuda), SEQ_LEN (512),
# BATCH (16), TOKENS1/2/3 (81920, 163840, 2097152 = 10, 20, 256 steps), DISTILL_ARGS (the
# recipe: "--lr 1e-3,1e-3,5e-4 --schedule cosine --ce-weight 1.0", i.e. peak lr per stage,
# warmup + cosine per stage, stage 3 = KL + cross-entropy), SCRATCH_TOKENS, SCRATCH_LR (1e-3),
# SCRATCH_GPU (unset: after the distillation, on the same GPU), EVAL_BATCHES (all of the val
# split), DATA (.distill/data), PYTHON.
# A rerun with the same WORK resumes the distillation (finished stages are skipped) and the
# scratch run. The markdown table is printed last (and saved as $OUT/table.md).
set -u
OUT="${OUT:-runs/distill_smollm2}"
WORK="${WORK:-/tmp/distill_smollm2}"
DATA="${DATA:-.distill/data}"
DEVICE="${DEVICE:-cuda}"
SEQ_LEN="${SEQ_LEN:-512}"
BATCH="${BATCH:-16}"
TOKENS1="${TOKENS1:-81920}"
TOKENS2="${TOKENS2:-163840}"
TOKENS3="${TOKENS3:-2097152}"
SCRATCH_TOKENS="${SCRATCH_TOKENS:-$(( TOKENS1 + TOKENS2 + TOKENS3 ))}"
SCRATCH_LR="${SCRATCH_LR:-1e-3}"
DISTILL_ARGS="${DISTILL_ARGS:---lr 1e-3,1e-3,5e-4 --schedule cosine --ce-weight 1.0}"
T_DISTILL="${T_DISTILL:-330}"
T_SCRATCH="${T_SCRATCH:-290}"
T_EVAL="${T_EVAL:-100}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT" "$WORK"
rm -f "$OUT/results.json"  # this run's evaluations only
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1  # float32 models; TF32 matmuls for both students alike
BRAID=("$PYTHON" -c 'import sys; from braid.cli import main; sys.exit(main())')
REPORT=("$PYTHON" bench/distill_report.py)
status_lines=()

step() {  # step NAME LIMIT_S COMMAND...: run time-boxed, log to $OUT/NAME.log, record the verdict
    local name=$1 limit=$2 start rc took verdict
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    took=$(( $(date +%s) - start ))
    verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    echo "=== $name: $verdict after ${took}s" | tee -a "$OUT/$name.log"
    status_lines+=("$(printf '%-9s %-14s %5ss' "$name" "$verdict" "$took")")
    return "$rc"
}

if [ -n "${GGUF_PARTS:-}" ]; then
    GGUF="$WORK/SmolLM2-135M-Instruct.Q4_1.gguf"
    # shellcheck disable=SC2086  # GGUF_PARTS is a space-separated list of paths
    cat $GGUF_PARTS > "$GGUF" || { echo "cannot join GGUF_PARTS=$GGUF_PARTS"; exit 2; }
fi
if [ ! -f "${GGUF:-}" ]; then echo "set GGUF=file.gguf or GGUF_PARTS='part0 part1' (GGUF=${GGUF:-})"; exit 2; fi
if [ ! -f "$DATA/manifest.json" ]; then echo "DATA=$DATA is not a prepared data dir (see docs/distill.md)"; exit 2; fi
echo "teacher $GGUF ($(stat -c %s "$GGUF") bytes), data $DATA, $DEVICE, seq $SEQ_LEN x batch $BATCH"
echo "stage tokens $TOKENS1,$TOKENS2,$TOKENS3; scratch tokens $SCRATCH_TOKENS (lr $SCRATCH_LR)"
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")'

scratch() {  # the from-scratch control: its config from the student's shape, then braid train
    "${REPORT[@]}" scratch-config --distill-run "$WORK/distill" --data "$DATA" --tokens "$SCRATCH_TOKENS" \
        --seq-len "$SEQ_LEN" --batch-size "$BATCH" --lr "$SCRATCH_LR" --device "$DEVICE" \
        --out-run "$WORK/scratch" --yaml "$OUT/scratch.yaml"
    step scratch "$T_SCRATCH" "${BRAID[@]}" train "$OUT/scratch.yaml"
}
if [ -n "${SCRATCH_GPU:-}" ]; then  # beside the distillation, once it has written the student's config
    (while [ ! -f "$WORK/distill/student_config.json" ]; do sleep 2; done
     CUDA_VISIBLE_DEVICES="$SCRATCH_GPU" scratch) &
    scratch_pid=$!
fi
# shellcheck disable=SC2086  # DISTILL_ARGS is a list of options
step distill "$T_DISTILL" "${BRAID[@]}" distill --teacher "$GGUF" --student mamba2 --stages 1,2,3 \
    --tokens "$TOKENS1,$TOKENS2,$TOKENS3" --data "$DATA" --out "$WORK/distill" \
    --seq-len "$SEQ_LEN" --batch-size "$BATCH" --device "$DEVICE" $DISTILL_ARGS
"${REPORT[@]}" stages --distill-run "$WORK/distill"
if [ -n "${SCRATCH_GPU:-}" ]; then wait "$scratch_pid"; else scratch; fi

step evaluate "$T_EVAL" "${REPORT[@]}" evaluate --models teacher,init,stage1,stage2,stage3,scratch \
    --gguf "$GGUF" --data "$DATA" --distill-run "$WORK/distill" --scratch-run "$WORK/scratch" \
    --seq-len "$SEQ_LEN" --batch-size "$BATCH" --device "$DEVICE" --results "$OUT/results.json" \
    ${EVAL_BATCHES:+--batches "$EVAL_BATCHES"}

cp "$WORK/distill/metrics.jsonl" "$OUT/distill_metrics.jsonl" 2>/dev/null
cp "$WORK/scratch/metrics.jsonl" "$OUT/scratch_metrics.jsonl" 2>/dev/null
echo
printf '%s\n' "${status_lines[@]}"
echo
"${REPORT[@]}" table --results "$OUT/results.json" | tee "$OUT/table.md"
