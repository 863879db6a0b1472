#!/usr/bin/env bash
# GPU kit, step (b): run on a GPU machine without a Rust toolchain (H200, CUDA 13.0 driver).
# Usage: bash run.sh KIT_DIR OUT_DIR
# A fixed sequence, each step with its own time budget (7.5 minutes in all), so a failed run can be
# fixed and rerun within the 15 minutes a machine is lent:
#   1. smoke     20 s  device found, one kernel right
#   2. tests    150 s  every GPU test (~110 trials incl. the emulator golden test)
#   3. sanitizer 40 s  compute-sanitizer memcheck on a subset
#   4. bench    230 s  the one criterion binary (GPU cases only): ceilings first, then every family,
#                      most important first, short criterion windows; a run cut short keeps what
#                      finished (criterion's files and the lk-bench.jsonl sidecar are written per case)
# Writes OUT_DIR/{smoke,tests,sanitizer,bench}.log, OUT_DIR/results.json (schema: README "GPU kit").
# LK_KIT_BENCH_FILTER=<regex> limits the bench step (e.g. a rerun of one family).
set -uo pipefail
kit=$(cd "${1:?kit dir}" && pwd)
out=$(mkdir -p "${2:?out dir}" && cd "$2" && pwd)
start=$(date +%s)
steps_json=""

# The kit's binaries are gzipped (scripts/gpu-kit-build.sh): unpack them outside OUT_DIR.
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
for name in gpu bench-kernels; do
  if [ -f "$kit/$name.gz" ]; then
    gzip -dc "$kit/$name.gz" >"$bin/$name" && chmod +x "$bin/$name"
  elif [ -f "$kit/$name" ]; then
    cp "$kit/$name" "$bin/$name"
  else
    echo "kit has no $name" >&2
  fi
done

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
step smoke 20 "$bin/gpu" --exact shrink_dense_f32_matches_cpu
step tests 150 "$bin/gpu" --test-threads 1
if command -v compute-sanitizer >/dev/null; then
  step sanitizer 40 compute-sanitizer --tool memcheck --error-exitcode 99 "$bin/gpu" --test-threads 1 shrink_dense
else
  echo "compute-sanitizer not found" >"$out/sanitizer.log"
fi
export CRITERION_HOME="$out/criterion" LK_BENCH_ONLY_CUDA=1
# One binary, 230 s: 0.1 s warm-up, 0.3 s measurement, 10 samples, light bootstrap.
step bench 230 "$bin/bench-kernels" --bench --noplot --warm-up-time 0.1 --measurement-time 0.3 \
  --nresamples 2000 ${LK_KIT_BENCH_FILTER:+"$LK_KIT_BENCH_FILTER"}

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
# The sidecar (benches/common/mod.rs): per case bytes, FLOPs, roofline; ceilings; memory records.
side = {}
sidecar = os.path.join(out, "criterion", "lk-bench.jsonl")
if os.path.exists(sidecar):
    for line in open(sidecar):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        side[r.get("id")] = r
benches = []
for est in glob.glob(os.path.join(out, "criterion", "**", "new", "estimates.json"), recursive=True):
    d = os.path.dirname(est)
    bench = json.load(open(os.path.join(d, "benchmark.json")))
    median_ns = json.load(open(est))["median"]["point_estimate"]
    tp = bench.get("throughput") or {}
    rec = side.get(bench["full_id"], {})
    nbytes = rec.get("bytes") or tp.get("Bytes") or tp.get("BytesDecimal")
    flops = rec.get("flops") or None
    b = {"id": bench["full_id"], "median_ns": median_ns, "bytes": nbytes,
         "gb_per_s": (nbytes / median_ns) if nbytes else None,
         "flops": flops, "tflop_per_s": (flops / median_ns / 1e3) if flops else None}
    if rec.get("roofline_ns"):
        b["roofline_ns"] = rec["roofline_ns"]
        b["pct_of_roofline"] = 100.0 * rec["roofline_ns"] / median_ns
        for k in ["bound", "compute", "timing", "sets", "l2_resident", "vs", "note", "eager_ns"]:
            if rec.get(k) not in (None, ""):
                b[k] = rec[k]
    benches.append(b)
ceilings = side.get("ceilings/cuda")
memory = [r for r in side.values() if r.get("kind") == "memory"]
results = {
    "schema": 2,
    "gpu": gpu[0] if gpu else "unknown", "driver": gpu[1] if len(gpu) > 1 else "unknown",
    "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": open(os.path.join(kit, "COMMIT")).read().split()[0],
    "command": "bash gpu-kit/run.sh gpu-kit $OUT",
    "steps": steps, "tests": tests, "benches": sorted(benches, key=lambda b: b["id"]),
    "ceilings": ceilings, "memory": sorted(memory, key=lambda m: m["id"]),
}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
failed = [t["name"] for t in tests if t["outcome"] == "failed"]
print(f"results.json: {len(tests)} test outcomes ({len(failed)} failed), {len(benches)} benches")
PY
echo "total $(( $(date +%s) - start ))s"
