#!/usr/bin/env bash
# The README's first command: set up .venv, then run SPCT in miniature end to end on this CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m megatron_grm.demo --run-dir "${1:-runs/demo}"
