#!/usr/bin/env bash
# Compiles the bench-only baseline kernels (benches/baseline/kernels.cu) to PTX with the pinned nvcc
# (compute_80: the driver JIT-compiles it for the GPU it runs on, no NVRTC needed there).
#   scripts/bench-ptx.sh           write benches/baseline/kernels.ptx
#   scripts/bench-ptx.sh --check   fail if the committed PTX is not what the source compiles to (CI)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nvcc=${NVCC:-$root/.venv-cuda/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc}
src=$root/benches/baseline/kernels.cu
dst=$root/benches/baseline/kernels.ptx
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$nvcc" -std=c++17 -O3 -arch=compute_80 -ptx "$src" -o "$tmp"
# nvcc's header names the compiler build; keep the file stable across identical compilers only.
if [ "${1:-}" = "--check" ]; then
  cmp -s "$tmp" "$dst" || { echo "benches/baseline/kernels.ptx is stale: run bash scripts/bench-ptx.sh" >&2; exit 1; }
  echo "bench PTX: current"
else
  cp "$tmp" "$dst"
  echo "wrote $dst"
fi
