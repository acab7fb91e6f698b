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
# pip warns once per package about index locations that are absent on some machines; keep
# the log readable (errors still show).
quiet_pip() {
    "$venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
}
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/requirements-pinned.txt" -nt "$stamp" ]; then
    echo "setting up $venv (torch pinned; a few minutes the first time)" >&2
    quiet_pip install -q --upgrade pip
    quiet_pip install -q -c "$root/requirements-pinned.txt" -r "$root/requirements-pinned.txt"
    quiet_pip install -q -c "$root/requirements-pinned.txt" -e "$root[test]"
    touch "$stamp"
fi
echo "$venv"
