#!/usr/bin/env bash
# Set up the environment (if needed) and run the embedded default: fetch a public-domain
# corpus, prepare shards, train tiny-hybrid on the CPU, evaluate, and generate a sample.
# Usage: bash scripts/demo.sh [--out DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/setup.sh" | tail -n 1)"
cd "$root"
exec "$venv/bin/braid" demo "$@"
