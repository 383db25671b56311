"""Wall time of one ablation study on the Ray backend against the local pool, same machine.

    python benchmarks/study_backends.py                       # 3 variants x 3 seeds, CPU, 2 workers
    python benchmarks/study_backends.py --smoke               # 2 x 2 x 10 steps: checks the script works
    python benchmarks/study_backends.py --device cuda         # one run per GPU on both backends

The same study (a tiny baby GPT on a slice of Shakespeare, chars tokenizer) runs from scratch
into a fresh folder on each backend, alternating local, ray, local, ray... for ``--repeats``
rounds. Both run ``--workers`` runs at once: the local pool as that many processes (a GPU each,
or an equal share of the cores), Ray as a local instance of that many CPUs (or GPUs) with one
CPU (GPU) per task. The table gives the median study wall time of each and the ratio
ray / local (the goal: within 5%); the Ray instance's start is timed apart, once, since a
cluster is started once for many studies. Ray keeps its worker processes between tasks while
the pool starts a Python process per run, so on short runs Ray can win.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def write_study(folder: Path, *, data: Path, variants: int, seeds: int, steps: int) -> Path:
    import yaml

    (folder / "text.txt").write_text(data.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    (folder / "bp.yaml").write_text(
        f"physlm: 1\nextends: {ROOT / 'blueprints' / 'baby-gpt.yaml'}\nname: tiny\n"
        "params: {vocab: 65, dim: 32, heads: 2, layers: 2, context: 32, dropout: 0.0}\n", encoding="utf-8")
    arms = [{"name": "base"}, {"name": "wide", "set": {"params.dim": 48}}, {"name": "low-lr", "set": {"train.lr": 3e-4}},
            {"name": "deep", "set": {"params.layers": 3}}][:variants]
    doc = {"study": "bench", "base": "bp.yaml", "variants": arms, "seeds": list(range(seeds)),
           "budget": {"steps": steps}, "data": "text.txt", "tokenizer": "chars",
           "train": {"batch_size": 8, "seq_len": 32, "warmup": 1, "eval_every": max(1, steps // 2), "eval_iters": 2}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="a text file (default: the shared tinyshakespeare)")
    p.add_argument("--variants", type=int, default=3, choices=(1, 2, 3, 4))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2, help="runs at once on both backends")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="2 variants x 2 seeds x 10 steps, one round")
    a = p.parse_args()
    if a.smoke:
        a.variants, a.seeds, a.steps, a.repeats = 2, 2, 10, 1

    from rich.console import Console

    import ray

    from physlm_graph.runtime.study import Execution, run_study

    quiet = Console(file=open(os.devnull, "w"), stderr=False)  # noqa: SIM115 - the runs' chatter
    work = Path(tempfile.mkdtemp(prefix="study-backends-"))
    study = write_study(work, data=Path(a.data), variants=a.variants, seeds=a.seeds, steps=a.steps)
    gpu = a.device == "cuda"
    t0 = time.perf_counter()
    ray.init(num_cpus=a.workers if not gpu else a.workers * 2, num_gpus=a.workers if gpu else 0,
             include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    backends = {
        "local": Execution(backend="local", device=a.device, workers=a.workers),
        "ray": Execution(backend="ray", device=a.device, cpus_per_run=1.0, gpus_per_run=1.0 if gpu else None),
    }
    walls: dict[str, list[float]] = {k: [] for k in backends}
    try:
        for r in range(a.repeats):
            for name, exe in backends.items():
                out = work / f"{name}-{r}"
                t = time.perf_counter()
                run_study(study, out=out, progress=False, console=quiet, execution=exe)
                walls[name].append(time.perf_counter() - t)
                shutil.rmtree(out)
                print(f"round {r + 1}: {name} {walls[name][-1]:.1f} s", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    runs = a.variants * a.seeds
    local, ray_s = statistics.median(walls["local"]), statistics.median(walls["ray"])
    print(f"study: {a.variants} variants x {a.seeds} seeds = {runs} runs of {a.steps} steps, {a.workers} at once, "
          f"{a.device}; {platform.node()}, {os.cpu_count()} cores, median of {a.repeats}; "
          f"Ray instance start {ray_start:.1f} s (not in the table)")
    print()
    print("| backend | study wall s (median) | each round | per run s | ratio vs local |")
    print("|---|---:|---|---:|---:|")
    for name, med in (("local pool", local), ("ray", ray_s)):
        each = ", ".join(f"{w:.1f}" for w in walls["local" if name == "local pool" else "ray"])
        print(f"| {name} | {med:.1f} | {each} | {med / runs * a.workers:.2f} | {med / local:.3f} |")


if __name__ == "__main__":
    main()
