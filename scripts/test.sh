#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_VISIBLE_DEVICES=""
.venv/bin/ruff check .
.venv/bin/lint-imports
exec .venv/bin/pytest -q "$@"
