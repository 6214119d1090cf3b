#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: pip takes these two from the machine's local wheels; an unpinned
# torch would download a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
# A Compose implementation that needs no engine, to check docker-compose.yml (optional).
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null) || echo "setup: docker-compose not installed; the compose check will be skipped"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, flwr, timm; print("torch", torch.__version__, "flwr", flwr.__version__ if hasattr(flwr, "__version__") else "", "timm", timm.__version__)'))"
