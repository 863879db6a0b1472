#!/usr/bin/env bash
# Builds liblora_kernels_emu.a without Rust and runs the C conformance program against it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/target/c-libs
bash "$root/scripts/build-c-libs.sh" --emu-only "$out" >/dev/null
cc -std=c99 -O1 -Wall -Wextra -Werror -pedantic -I"$out/include" "$root/tests/c/conformance.c" \
  "$out/liblora_kernels_emu.a" -lstdc++ -lpthread -lm -o "$out/conformance"
"$out/conformance"
