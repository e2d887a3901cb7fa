#!/usr/bin/env bash
# Set up (if needed) and run the quickstart on the embedded default: no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/vlprompt run examples/quickstart.yaml "$@"
