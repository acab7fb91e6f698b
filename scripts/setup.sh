#!/usr/bin/env bash
# Create .venv (if missing) with torch pinned, and install braid in editable mode.
# Usage: bash scripts/setup.sh            (idempotent; BRAID_VENV overrides the location)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${BRAID_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.braid-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/requirements-pinned.txt" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c "$root/requirements-pinned.txt" -r "$root/requirements-pinned.txt"
    "$venv/bin/python" -m pip install -q -c "$root/requirements-pinned.txt" -e "$root[test]"
    touch "$stamp"
fi
echo "$venv"
