#!/usr/bin/env bash
# Create .venv and install vlprompt, its kernels and every plug-in under plugins/ (editable).
# Idempotent: a second call only reinstalls when a pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLPROMPT_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.vlprompt-installed"
want=$(cat pyproject.toml kernels/pyproject.toml plugins/*/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned to the builds these machines keep on disk (a bare `torch` may
# pull other multi-GB builds); open_clip needs torchvision.
pip install "torch==2.14.1" "torchvision==0.29.1" 2> >(grep -v "is ignored: it is neither" >&2)
plugins=()
for p in plugins/*/; do plugins+=(-e "$p"); done
pip install -e kernels -e ".[test,ray]" "${plugins[@]}" nox 2> >(grep -v "is ignored: it is neither" >&2)
echo "$want" > "$stamp"
