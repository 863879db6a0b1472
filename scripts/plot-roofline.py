#!/usr/bin/env python3
"""Roofline plot of a GPU kit run: achieved TFLOP/s against arithmetic intensity (FLOP per minimum
byte) for every case with FLOPs, under the run's measured ceilings (copy bandwidth as the slanted
roof, cuBLAS f16 / bf16 / f32 GEMM rates as the flat ones), and achieved GB/s of the purely
memory-bound cases against the copy bandwidth.

Usage:
  python3 scripts/plot-roofline.py OUT/results.json [-o roofline.png]
  python3 scripts/plot-roofline.py --self-test     # synthetic data in a temp dir: exercises this
                                                   # script and results-to-md.py; writes nothing here
matplotlib runs in a project-local venv, `.venv-plot/` (git-ignored), that this script creates on
first use from the exact pins in scripts/plot-requirements.txt (needs PyPI once), then re-runs
itself in it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-plot")
VPY = os.path.join(VENV, "bin", "python")


def ensure_venv():
    """Re-executes this script under .venv-plot (creating it from the pins if needed)."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    stamp = os.path.join(VENV, ".lk-plot-requirements")
    req = os.path.join(ROOT, "scripts", "plot-requirements.txt")
    want = open(req).read()
    if not os.path.exists(stamp) or open(stamp).read() != want:
        print(f"plot-roofline: creating {VENV} from {req}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([VPY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", req])
        open(stamp, "w").write(want)
    os.execv(VPY, [VPY, os.path.abspath(__file__)] + sys.argv[1:])


def plot(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.load(open(results))
    c = r.get("ceilings")
    if not c:
        raise SystemExit(f"{results} has no ceilings (schema 2 results from a GPU run are needed)")
    bw = c["copy_gb_s"]  # bytes per ns = GB/s
    roofs = [(k, c.get(f"tflops_{k}")) for k in ["f16", "bf16", "f32"]]
    roofs = [(k, v) for k, v in roofs if v]
    benches = [b for b in r["benches"] if b.get("median_ns")]
    comp = [b for b in benches if b.get("flops") and b.get("bytes")]
    mem = [b for b in benches if not b.get("flops") and b.get("bytes") and b.get("roofline_ns")]

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw={"width_ratios": [3, 2]})
    families = sorted({b["id"].split("/")[0] for b in comp + mem})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    markers = {"tensor_f16": "o", "tensor_bf16": "s", "fma_f32": "^", "memory": "D"}

    ais = [b["flops"] / b["bytes"] for b in comp] or [1.0]
    lo, hi = min(ais + [0.1]) / 2, max(ais + [1e4]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [x * bw / 1e3 for x in xs], "k--", lw=1, label=f"copy bandwidth {bw:.0f} GB/s")
    for (k, v), ls in zip(roofs, ["-", "-.", ":"]):
        ax.plot(xs, [min(x * bw / 1e3, v) for x in xs], "k", ls=ls, lw=1.5, label=f"cuBLAS {k} {v:.0f} TFLOP/s")
    for b in comp:
        ai = b["flops"] / b["bytes"]
        perf = b["flops"] / b["median_ns"] / 1e3
        fam = b["id"].split("/")[0]
        baseline = (b.get("vs") or {}).get("relation") == "baseline"
        ax.scatter(ai, perf, marker=markers.get(b.get("compute"), "o"), s=36,
                   facecolors="none" if baseline else colors[fam], edgecolors=colors[fam])
    for f in families:
        ax.scatter([], [], color=colors[f], label=f)
    ax.scatter([], [], facecolors="none", edgecolors="k", label="baseline (cuBLAS)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per minimum byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    mem = sorted(mem, key=lambda b: b["bytes"] / b["median_ns"])[-40:]
    ys = range(len(mem))
    bx.barh(list(ys), [b["bytes"] / b["median_ns"] for b in mem], color=[colors[b["id"].split("/")[0]] for b in mem])
    bx.axvline(bw, color="k", ls="--", lw=1, label=f"copy bandwidth {bw:.0f} GB/s")
    bx.set_yticks(list(ys))
    bx.set_yticklabels(["/".join(b["id"].split("/")[2:]) for b in mem], fontsize=6)
    bx.set_xlabel("achieved GB/s (memory-bound cases without FLOPs)")
    bx.legend(fontsize=8)

    title = f"{r['gpu']} · {r['date']} · commit {r['commit'][:12]}"
    if r.get("synthetic"):
        title = "SYNTHETIC DATA (self-test) — not a measurement · " + title
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png} ({len(comp)} cases on the roofline, {len(mem)} memory-bound)")


def synthetic(path):
    """A schema-2 results.json with made-up but plausibly shaped numbers, marked synthetic."""
    import random

    rnd = random.Random(1)
    benches, bw = [], 4000.0
    for fam, case, by, fl, comp in [
        ("bgmv", "lora/qkv_r16_t64_distinct", 38e6, 2.4e8, "fma_f32"),
        ("bgmv", "cublas_loop/qkv_r16_t64_distinct", 38e6, 2.4e8, "fma_f32"),
        ("sgmv", "lora/qkv_r16_t2048_distinct", 40e6, 6.4e9, "tensor_f16"),
        ("gemm", "ours_f16_nt/qkv_t4096_4096x6144x4096", 1.5e8, 2.06e11, "tensor_f16"),
        ("gemm", "cublas_f16_nt/qkv_t4096_4096x6144x4096", 1.5e8, 2.06e11, "tensor_f16"),
        ("merge", "merge/f16_q_proj_4096x4096_r16", 6.7e7, 0, "memory"),
        ("block", "rmsnorm_forward_bf16/t4096_d4096", 6.7e7, 0, "memory"),
    ]:
        roof = max(by / bw, fl / 700e3 if comp.startswith("tensor") else fl / 50e3)
        med = roof / rnd.uniform(0.3, 0.95)
        b = {"id": f"{fam}/cuda/{case}", "median_ns": med, "bytes": by, "gb_per_s": by / med,
             "flops": fl or None, "tflop_per_s": fl / med / 1e3 if fl else None, "roofline_ns": roof,
             "pct_of_roofline": 100 * roof / med, "bound": "memory", "compute": comp, "timing": "graph"}
        if "cublas_loop" in case:
            b["vs"] = {"id": "bgmv/cuda/lora/qkv_r16_t64_distinct", "label": "cuBLAS GEMM per adapter run", "relation": "baseline"}
        if "cublas_f16" in case:
            b["vs"] = {"id": "gemm/cuda/ours_f16_nt/qkv_t4096_4096x6144x4096", "label": "cuBLAS GemmEx", "relation": "baseline"}
        benches.append(b)
    r = {"schema": 2, "synthetic": True, "gpu": "SYNTHETIC", "driver": "none", "date": "1970-01-01T00:00:00Z",
         "commit": "0" * 40, "command": "plot-roofline.py --self-test", "steps": [], "tests": [], "benches": benches,
         "ceilings": {"device": "SYNTHETIC", "l2_bytes": 60 << 20, "copy_gb_s": bw, "launch_sync_ns": 5000.0,
                      "graph_node_ns": 1200.0, "tflops_f16": 700.0, "tflops_bf16": 690.0, "tflops_f32": 50.0},
         "memory": [{"kind": "memory", "id": "memory/activations/llama3-8b/t4096_r16_bf16_p0.05",
                     "ours_bytes": 7.0e9, "theirs_bytes": 15.3e9}]}
    json.dump(r, open(path, "w"), indent=1)


def self_test():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = os.path.join(d, "results.json")
        synthetic(res)
        png = os.path.join(d, "roofline.png")
        plot(res, png)
        assert os.path.getsize(png) > 10_000, "the PNG is suspiciously small"
        readme = os.path.join(d, "README.md")
        open(readme, "w").write("x\n<!-- gpu-results:begin -->\n<!-- gpu-results:end -->\n")
        bm = os.path.join(d, "BENCHMARKS.md")
        subprocess.check_call([sys.executable, os.path.join(ROOT, "scripts", "results-to-md.py"), res,
                               "--readme", readme, "--benchmarks", bm])
        text = open(bm).read()
        for want in ["% of roofline", "## Comparisons", "ours = ", "## Memory"]:
            assert want in text, f"BENCHMARKS.md lacks {want!r}"
        print("plot-roofline self-test: ok (synthetic data, temporary files only)")


def main():
    ensure_venv()
    args = sys.argv[1:]
    if args == ["--self-test"]:
        return self_test()
    if not args or args[0].startswith("-"):
        raise SystemExit(__doc__)
    png = "roofline.png"
    if "-o" in args:
        png = args[args.index("-o") + 1]
    plot(args[0], png)


if __name__ == "__main__":
    main()
