#!/usr/bin/env bash
# Builds the kernel libraries for C/C++ users, without Rust:
#   <out>/liblora_kernels_emu.a   the SIMT emulator build (g++; link with -lstdc++ -lpthread)
#   <out>/liblora_kernels_cuda.a  the GPU build (nvcc; link with -lcudart_static -lrt -lpthread -ldl -lstdc++)
#   <out>/liblora_kernels_cuda.so the GPU build as a shared library (cudart linked in statically)
#   <out>/include/lora_kernels.h  the header (declares lk_cuda_* and lk_emu_*)
# Usage: scripts/build-c-libs.sh [--emu-only] [OUT_DIR]   (default OUT_DIR: target/c-libs)
# Environment: CXX (default g++), NVCC (default: the setup script's pinned nvcc), LK_CUDA_ARCHS (80,90).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
emu_only=0
if [ "${1:-}" = "--emu-only" ]; then emu_only=1; shift; fi
out=${1:-$root/target/c-libs}
mkdir -p "$out/include" "$out/obj/emu" "$out/obj/cuda"
cxx=${CXX:-g++}
pids=()
# Waits for every background compile; fails if any failed (a bare `wait` would not).
wait_all() { local p; for p in "${pids[@]}"; do wait "$p"; done; pids=(); }
cp "$root/cuda/lora_kernels.h" "$out/include/"

# -fstack-clash-protection: a frame larger than a fiber stack's guard pages probes them instead of jumping over.
cxxflags=(-std=c++17 -O2 -g -fPIC -DLK_BACKEND_EMU -fstack-clash-protection -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter -I"$root/cuda")
objs=()
for f in "$root"/cuda/emu/*.cpp; do
  o="$out/obj/emu/$(basename "$f" .cpp).runtime.o"
  "$cxx" "${cxxflags[@]}" -c "$f" -o "$o" & pids+=($!); objs+=("$o")
done
for f in "$root"/cuda/*.cu; do
  o="$out/obj/emu/$(basename "$f" .cu).o"
  "$cxx" "${cxxflags[@]}" -x c++ -c "$f" -o "$o" & pids+=($!); objs+=("$o")
done
wait_all
rm -f "$out/liblora_kernels_emu.a"
ar crs "$out/liblora_kernels_emu.a" "${objs[@]}"
echo "built $out/liblora_kernels_emu.a"
[ "$emu_only" = 1 ] && exit 0

nvcc=${NVCC:-$root/.venv-cuda/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc}
if [ ! -x "$nvcc" ]; then nvcc=$(command -v nvcc || true); fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "nvcc not found: run scripts/setup.sh or set NVCC" >&2
  exit 1
fi
archs=${LK_CUDA_ARCHS:-80,90}
gencode=()
newest=0
for a in ${archs//,/ }; do
  gencode+=("-gencode=arch=compute_$a,code=sm_$a")
  [ "$a" -gt "$newest" ] && newest=$a
done
gencode+=("-gencode=arch=compute_$newest,code=compute_$newest")
cobjs=()
for f in "$root"/cuda/*.cu; do
  o="$out/obj/cuda/$(basename "$f" .cu).o"
  "$nvcc" -std=c++17 -O3 -lineinfo -DLK_BACKEND_CUDA -Xcompiler=-fPIC "${gencode[@]}" -I"$root/cuda" -c "$f" -o "$o" &
  pids+=($!); cobjs+=("$o")
done
wait_all
rm -f "$out/liblora_kernels_cuda.a"
ar crs "$out/liblora_kernels_cuda.a" "${cobjs[@]}"
cudart_dir=$(dirname "$nvcc")/../lib
[ -f "$cudart_dir/libcudart_static.a" ] || cudart_dir=$(dirname "$nvcc")/../lib64
"$nvcc" -shared -Xcompiler=-fPIC -o "$out/liblora_kernels_cuda.so" "${cobjs[@]}" -L"$cudart_dir" -lcudart_static -lrt -lpthread -ldl
echo "built $out/liblora_kernels_cuda.a and $out/liblora_kernels_cuda.so"
