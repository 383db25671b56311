"""How fast does the compiler check a blueprint, and how much memory does it take?

1. ``physlm-graph build blueprints/gpt2-124m.yaml`` end to end, interpreter start included
   (goal: under 3 s), median of several runs.
2. The LLaMA-2 7B blueprint: validate and infer shapes after import (goal: at most 2 s) and the
   process's peak RSS (goal: at most 600 MB); no weights are allocated (meta device).

    python benchmarks/compile_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import physlm_graph
from physlm_graph import compile_blueprint, REGISTRY
REGISTRY.names()  # import the component library, as any real use does
t1 = time.perf_counter()
cm = compile_blueprint(sys.argv[1], build=False)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "check_s": t2 - t1, "params": cm.num_params,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    build = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "physlm_graph", "build", str(ROOT / "blueprints/gpt2-124m.yaml")],
                       check=True, capture_output=True, cwd=ROOT)
        build.append(time.perf_counter() - t0)
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "blueprints/llama2-7b.yaml")],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    b = statistics.median(build)
    c = statistics.median(r["check_s"] for r in runs)
    rss = max(r["peak_rss_mb"] for r in runs)
    print(f"median of {args.repeats} runs, python {sys.version.split()[0]}")
    print()
    print("| measurement | value | goal | |")
    print("|---|---:|---:|---|")
    print(f"| `physlm-graph build gpt2-124m.yaml` wall (interpreter start included) | {b:.2f} s | < 3 s | {'ok' if b < 3 else 'FAIL'} |")
    print(f"| 7B validate + infer shapes, after import | {c:.2f} s | <= 2 s | {'ok' if c <= 2 else 'FAIL'} |")
    print(f"| 7B peak RSS of the process | {rss:.0f} MB | <= 600 MB | {'ok' if rss <= 600 else 'FAIL'} |")
    print(f"| 7B parameters reported | {runs[0]['params']:,} | 6,738,415,616 | {'ok' if runs[0]['params'] == 6738415616 else 'FAIL'} |")
    print(f"| import physlm_graph + component library | {statistics.median(r['import_s'] for r in runs):.2f} s | | |")


if __name__ == "__main__":
    main()
