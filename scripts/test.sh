#!/usr/bin/env bash
# Set up the environment (if needed) and run the CPU test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/setup.sh" | tail -n 1)"
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
