#!/usr/bin/env bash
# GPU kit, step (b): run on a GPU machine without a Rust toolchain (H200, CUDA 13.0 driver).
# Usage: bash run.sh KIT_DIR OUT_DIR
# A fixed sequence, each step with its own time budget (5 minutes in all), so a failed run can be
# fixed and rerun within the 15 minutes a machine is lent:
#   1. smoke     20 s  device found, one kernel right
#   2. tests     80 s  every GPU test (incl. the emulator golden test)
#   3. sanitizer 40 s  compute-sanitizer memcheck on a subset
#   4. benches  160 s  criterion benches (GPU cases only), an equal share per bench binary
# Writes OUT_DIR/{smoke,tests,sanitizer,bench-*}.log, OUT_DIR/results.json (schema: README "GPU kit").
set -uo pipefail
kit=$(cd "${1:?kit dir}" && pwd)
out=$(mkdir -p "${2:?out dir}" && cd "$2" && pwd)
start=$(date +%s)
steps_json=""

# cuBLAS (benchmark baselines) comes from the Python nvidia-cublas package on that machine.
cublas_dirs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
paths = site.getsitepackages() + [site.getusersitepackages()]
seen = set()
for p in paths:
    for lib in glob.glob(os.path.join(p, "nvidia", "**", "libcublas*.so*"), recursive=True):
        seen.add(os.path.dirname(lib))
print(":".join(sorted(seen)))
PY
)
[ -n "$cublas_dirs" ] && export LD_LIBRARY_PATH="$cublas_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step() { # name budget_s command...
  local name=$1 budget=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "step $name: rc=$rc ${dt}s (budget ${budget}s)"
  steps_json+="{\"name\":\"$name\",\"rc\":$rc,\"seconds\":$dt,\"budget\":$budget},"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1 || true
step smoke 20 "$kit/gpu" --exact shrink_dense_f32_matches_cpu
step tests 80 "$kit/gpu" --test-threads 1
if command -v compute-sanitizer >/dev/null; then
  step sanitizer 40 compute-sanitizer --tool memcheck --error-exitcode 99 "$kit/gpu" --test-threads 1 shrink_dense
else
  echo "compute-sanitizer not found" >"$out/sanitizer.log"
fi
export CRITERION_HOME="$out/criterion" LK_BENCH_ONLY_CUDA=1
# 160 s for all benches together: short criterion windows, an equal share per binary.
benches=("$kit"/bench-*)
per_bench=$(( 160 / ${#benches[@]} ))
[ "$per_bench" -lt 15 ] && per_bench=15
for b in "${benches[@]}"; do
  step "$(basename "$b")" "$per_bench" "$b" --bench --noplot --warm-up-time 0.5 --measurement-time 1.5
done

python3 - "$kit" "$out" "[${steps_json%,}]" <<'PY'
import datetime, glob, json, os, re, sys
kit, out, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
gpu = open(os.path.join(out, "gpu.txt")).read().strip().split(", ")
tests = []
for log in ["tests.log", "sanitizer.log"]:
    p = os.path.join(out, log)
    if not os.path.exists(p):
        continue
    for line in open(p, errors="replace"):
        m = re.match(r"test (\S+)\s+\.\.\. (ok|FAILED|ignored)(?: \((.*)\))?", line.strip())
        if m:
            tests.append({"name": m.group(1), "step": log[:-4], "outcome": m.group(2).lower(), "reason": m.group(3)})
benches = []
for est in glob.glob(os.path.join(out, "criterion", "**", "new", "estimates.json"), recursive=True):
    d = os.path.dirname(est)
    bench = json.load(open(os.path.join(d, "benchmark.json")))
    median_ns = json.load(open(est))["median"]["point_estimate"]
    tp = bench.get("throughput") or {}
    nbytes = tp.get("Bytes") or tp.get("BytesDecimal")
    benches.append({"id": bench["full_id"], "median_ns": median_ns, "bytes": nbytes,
                    "gb_per_s": (nbytes / median_ns) if nbytes else None})
results = {
    "schema": 1,
    "gpu": gpu[0] if gpu else "unknown", "driver": gpu[1] if len(gpu) > 1 else "unknown",
    "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": open(os.path.join(kit, "COMMIT")).read().split()[0],
    "command": "bash gpu-kit/run.sh gpu-kit $OUT",
    "steps": steps, "tests": tests, "benches": sorted(benches, key=lambda b: b["id"]),
}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
failed = [t["name"] for t in tests if t["outcome"] == "failed"]
print(f"results.json: {len(tests)} test outcomes ({len(failed)} failed), {len(benches)} benches")
PY
echo "total $(( $(date +%s) - start ))s"
