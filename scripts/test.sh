#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, offline, in parallel.
# -n: one worker per core (at most 4; each holds its own models); --dist loadscope: the
# tests of a module (or of a test class) share a worker, so their module- and class-scoped
# fixtures (trained runs, built environments) are made once; --no-loadscope-reorder: modules
# go to the workers in collection order, the longest first (tests/conftest.py, LONGEST_FIRST).
# Arguments go to pytest (e.g. `-n 0` for one process, `-m "not slow"` for a quick pass).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder "$@"
