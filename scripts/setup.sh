#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build lora-kernels, idempotently:
#   - libclang-dev (bindgen needs libclang)
#   - the CUDA 13.0 compiler from exactly pinned PyPI wheels, into .venv-cuda/ (git-ignored).
#     nvvm must stay 13.0: 13.5 emits PTX ISA 9.5, which the H200's CUDA 13.0 driver rejects.
#   - cuobjdump/nvdisasm (no 13.0 build exists; one exact newer version reads sm_90 cubins).
# Quick when everything is already there. Usage: bash scripts/setup.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-cuda"
nvcc_pin="13.0.88"
tools_pin="13.2.86" # cuobjdump / nvdisasm, installed with --no-deps

need_sudo() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }

if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 && ! ldconfig -p | grep -q 'libclang[-.0-9]*\.so'; then
  echo "setup: installing libclang-dev (bindgen)"
  $(need_sudo) apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $(need_sudo) apt-get install -y -qq libclang-dev >/dev/null
fi

nvcc="$venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc"
stamp="$venv/.lk-setup-$nvcc_pin-$tools_pin"
if [ ! -f "$stamp" ]; then
  echo "setup: installing pinned CUDA $nvcc_pin compiler wheels into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==$nvcc_pin" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    "nvidia-cuda-cuobjdump==$tools_pin" "nvidia-cuda-nvdisasm==$tools_pin"
  "$nvcc" --version >/dev/null
  touch "$stamp"
fi
echo "setup: ok (nvcc: $nvcc)"
