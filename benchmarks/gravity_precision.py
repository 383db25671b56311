"""How close the gravity Triton kernel is to the exact function, for the precision of its
coordinate products (``PHYSLM_GRAVITY_ZDOT``: ``ieee`` fp32 FMA or ``tf32x3``), on CUDA.

    python benchmarks/gravity_precision.py [--seeds 5]
    PHYSLM_GRAVITY_ZDOT=tf32x3 python benchmarks/gravity_precision.py

For each score (faithful hard, faithful soft, fixed soft) and seed: the forward and every
gradient of the kernel in fp32, of the kernel with bf16 values (P @ V in bf16, as under
autocast) and of the materialised path with bf16 values, each as a norm-wise relative error
against the materialised path in fp64 (the same function, exactly). Prints the median and the
worst over seeds of the fp32 error and of the ratio kernel bf16 / materialised bf16 (1 = as
accurate as the materialised path). The inputs are the GPU test's (B 4, H 4, T 300, c 16, d 64).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "components"))

from physlm_graph.components.attention import _gravity_triton as gt  # noqa: E402
from physlm_graph.components.attention._gravity_kernels import gravity_materialised  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, not {args.seeds}")
    if not torch.cuda.is_available():
        print("gravity_precision.py needs CUDA (the kernel's precision is a GPU question)", file=sys.stderr)
        return 2
    from test_gravity_triton import _inputs, _leaves, _rel, _run, _spec  # the GPU test's inputs and helpers

    print(f"coordinate products: {gt.ZDOT_PRECISION}; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    Bn, Hn, T, c, d = 4, 4, 300, 16, 64
    print("| score | output / grad | fp32 rel err, median | worst | bf16: kernel / materialised err, median | worst |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, cutoff in (("faithful", "hard"), ("faithful", "soft"), ("fixed", "soft")):
        spec = _spec(mode, cutoff, "score")
        e32: dict[str, list[float]] = {}
        ratio: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            ins = _inputs(spec, 1, T, c, d, seed=seed, Bn=Bn, Hn=Hn)
            w = torch.randn(Bn, Hn, T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed)).cuda()
            want, want_g = _run(gravity_materialised, spec, _leaves(ins, torch.float64, "cuda"), w)
            got, got_g = _run(gt.gravity_triton, spec, _leaves(ins, torch.float32, "cuda"), w)
            bf = [t.float() if t is not None else None for t in ins]
            bf[1] = bf[1].bfloat16()
            kb, kb_g = _run(gt.gravity_triton, spec, _leaves(bf, None, "cuda"), w)
            mb, mb_g = _run(gravity_materialised, spec, _leaves(bf, None, "cuda"), w)
            pairs = [("out", got, kb, mb, want)] + [
                (n, got_g[n], kb_g[n], mb_g[n], want_g[n]) for n in want_g if want_g[n] is not None]
            for n, g32, gk, gm, gw in pairs:
                e32.setdefault(n, []).append(_rel(g32, gw))
                ratio.setdefault(n, []).append(_rel(gk, gw) / max(_rel(gm, gw), 1e-12))
        for n in e32:
            print(f"| {mode} {cutoff} | {n} | {statistics.median(e32[n]):.1e} | {max(e32[n]):.1e} | "
                  f"{statistics.median(ratio[n]):.2f} | {max(ratio[n]):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
