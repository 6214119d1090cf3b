#!/usr/bin/env bash
# Set up (if needed) and run the embedded federated Ark+ demo: three simulated hospitals on
# Flower's simulation engine, then a centralized run of equal budget, then the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ark demo --fresh "$@"
