#!/usr/bin/env bash
# GPU kit, step (a): build here (no GPU needed) everything a GPU machine without Rust needs.
#   gpu-kit/gpu.gz            the GPU test binary (tests/gpu.rs), sm_90 only
#   gpu-kit/bench-kernels.gz  the one criterion bench binary (benches/kernels.rs: every family)
#   gpu-kit/run.sh            step (b) (unpacks the binaries into a temporary directory there),
#                             gpu-kit/COMMIT, gpu-kit/GLIBC
# Binaries are stripped, libstdc++ is linked statically, each binary is dry-run here (its GPU cases
# must report "no CUDA device"), then gzipped (each carries the same ~20 MB sm_90 fatbin, which
# compresses well); the folder must stay under 60 MiB.
# Usage: bash scripts/gpu-kit-build.sh [KIT_DIR]   (default: gpu-kit/, git-ignored)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kit=${1:-$root/gpu-kit}
max_glibc=${LK_KIT_MAX_GLIBC:-2.35}
export CARGO_TARGET_DIR=$root/target/gpu-kit LK_CUDA_ARCHS=90 LK_CUDA_PTX=0 LK_STATIC_LIBSTDCXX=1
export LK_KERNEL_CACHE=$root/target/lk-kernel-cache
cd "$root"
json=$(mktemp)
cargo test --release --features cuda --test gpu --no-run --message-format=json >"$json"
cargo bench --features cuda --no-run --message-format=json >>"$json"
rm -rf "$kit"
mkdir -p "$kit"
python3 - "$json" "$kit" <<'PY'
import json, shutil, sys
src, kit = sys.argv[1], sys.argv[2]
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kinds, name = m["target"]["kind"], m["target"]["name"]
    if "test" in kinds and name == "gpu":
        shutil.copy(m["executable"], f"{kit}/gpu")
    elif "bench" in kinds:
        shutil.copy(m["executable"], f"{kit}/bench-{name}")
PY
rm -f "$json"
[ -f "$kit/gpu" ] || { echo "gpu test binary not built" >&2; exit 1; }
[ -f "$kit/bench-kernels" ] || { echo "bench binary (benches/kernels.rs) not built" >&2; exit 1; }
strip "$kit"/gpu "$kit"/bench-*
cp scripts/gpu-kit-run.sh "$kit/run.sh"
git rev-parse HEAD >"$kit/COMMIT" 2>/dev/null || echo unknown >"$kit/COMMIT"
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || echo "+dirty" >>"$kit/COMMIT"

# glibc: the newest symbol version any binary needs must exist on the GPU machine.
need=$(for f in "$kit"/gpu "$kit"/bench-*; do objdump -T "$f" | grep -o 'GLIBC_[0-9.]*'; done | sort -Vu | tail -1)
echo "$need" >"$kit/GLIBC"
if [ "$(printf '%s\n%s\n' "${need#GLIBC_}" "$max_glibc" | sort -V | tail -1)" != "$max_glibc" ]; then
  echo "kit binaries need $need, newer than LK_KIT_MAX_GLIBC=$max_glibc" >&2
  exit 1
fi
if ldd "$kit/gpu" | grep -q libstdc++; then echo "libstdc++ is linked dynamically" >&2; exit 1; fi
raw=$(du -sm "$kit" | cut -f1)

# Dry run: without a GPU every GPU case must say so (the bench binary runs in full: its GPU
# families report the missing device, its host cases are off as on the GPU machine).
out=$("$kit/gpu" 2>&1) || { echo "$out"; exit 1; }
echo "$out" | grep -q "no CUDA device" || { echo "$out"; echo "gpu binary did not report 'no CUDA device'" >&2; exit 1; }
echo "$out" | grep -qE "test result: ok\. 0 passed; 0 failed; [1-9][0-9]* ignored" || { echo "$out"; echo "expected every GPU test ignored" >&2; exit 1; }
for b in "$kit"/bench-*; do
  bout=$(LK_BENCH_ONLY_CUDA=1 "$b" --bench 2>&1) || { echo "$bout"; exit 1; }
  echo "$bout" | grep -q "no CUDA device" || { echo "$bout"; echo "$b did not report 'no CUDA device'" >&2; exit 1; }
done

gzip -9 -n "$kit"/gpu "$kit"/bench-*
size=$(du -sm "$kit" | cut -f1)
[ "$size" -lt 60 ] || { echo "kit is ${size} MiB (limit 60)" >&2; exit 1; }
echo "gpu kit: $kit (${size} MiB gzipped, ${raw} MiB unpacked, needs $need, commit $(head -1 "$kit/COMMIT")); dry run ok"
