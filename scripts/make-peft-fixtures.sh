#!/usr/bin/env bash
# Regenerates tests/fixtures/peft/ with PEFT itself (CPU torch, tiny random Llama configs; nothing
# is fetched from a model hub). Creates its own virtual environment .venv-peft/ (git-ignored).
# CI does not run this; it runs the Rust tests over the committed fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-peft/bin/python ]; then
  "$PY" -m venv .venv-peft
fi
# Pinned so the fixtures are reproducible; torch from PyPI (pulls CUDA wheels, runs on CPU).
.venv-peft/bin/pip install --quiet --disable-pip-version-check \
  "torch==2.5.1" "transformers==4.46.3" "peft==0.15.2" "safetensors==0.4.5" "numpy<2.2"
.venv-peft/bin/python scripts/make-peft-fixtures.py "$@"
