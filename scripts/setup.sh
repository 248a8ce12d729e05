#!/usr/bin/env bash
# Create .venv and install jp-peft with the pinned NeMo 2.0 stack.
# Idempotent: re-running only reinstalls when pyproject.toml changed.
#   bash scripts/setup.sh            # CPU machine or GPU workstation
#   PYTHON=python3.11 bash scripts/setup.sh
# torch: a machine with an NVIDIA driver gets PyPI's CUDA build of torch 2.13.0; a CPU
# machine gets 2.13.0 too, and pip prefers a local CPU wheel where one is on the
# find-links path (as on our CI machines). Inside NVIDIA's NeMo container run
# `pip install --no-deps -e .` instead: the container's torch is the one to keep.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the CUDA build of torch 2.13.0"
  else
    echo "setup: no GPU: installing the CPU build of torch 2.13.0"
  fi
  $PIP install "torch==2.13.0"
fi

echo "setup: installing jp-peft and the NeMo 2.0 stack (a few minutes the first time)"
$PIP install -e ".[test]"
echo "$want" > "$STAMP"
echo "setup: done. Activate with: source $VENV/bin/activate"
