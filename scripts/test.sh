#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=1
exec .venv/bin/python -m pytest "$@"
