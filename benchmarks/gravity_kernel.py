"""Inverse-square gravity attention kernels, forward + backward: the fused Triton kernel
(``gravity_triton``) against ``compiled_materialised`` (torch.compile of the fp32 (B, H, T, T)
softmax) and causal SDPA of the same B, H, T, d (the floor any attention pays).

    python benchmarks/gravity_kernel.py [--batch 16] [--heads 8] [--T 512] [--d 64] [--c 16] [--iters 30] [--dropout 0.1]

CUDA only (exits with a message otherwise). v is bf16 (as under autocast), coordinates fp32;
one call = forward + backward of <out, w> for a fixed random w, all inputs requiring grad,
attention dropout 0 (``--dropout p`` adds the Triton kernels and SDPA with dropout p, as NGT
trains: the kernel draws a Philox number per pair in the forward and again in the backward). Candidates are interleaved, CUDA-event timed, median of ``--iters`` (eager
calls: Python and launch overhead included, which dominate at small sizes); the "GPU ms"
column sums the device time of the kernels of one call (torch.profiler, mean of 5 calls): what
a compiled, CUDA-graphed model pays. Configs: faithful-hard-score (the seed) and
fixed-soft-score. Errors: max abs difference of the output and of each gradient between the
kernel and the materialised path (both with bf16 v), and, in brackets, the same for the
materialised path with bf16 v vs fp32 v (the error bf16 values cause on their own).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import describe_device, fmt, table, time_interleaved  # noqa: E402

from physlm_graph.components.attention import _gravity_triton as gt  # noqa: E402
from physlm_graph.components.attention._gravity_kernels import GravityScore, compiled_materialised  # noqa: E402

CONFIGS = {
    "faithful-hard-score": GravityScore("faithful", "hard", "score", 1e-6, 1.0, 1.0, False),
    "fixed-soft-score": GravityScore("fixed", "soft", "score", 1e-6, 1.0, 1.0, False),
}
NAMES = ("zh", "v", "gamma", "beta", "mass", "r2")


def inputs(spec: GravityScore, B: int, H: int, T: int, d: int, c: int, seed: int = 0) -> list:
    """NGT-like magnitudes: coordinates ~ N(0, 1), gamma ~ 0.69, r ~ 4, masses ~ softplus(N(0, 1))."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    zh = torch.randn(1, H, T, c, device=dev, generator=g)
    v = torch.randn(B, H, T, d, device=dev, generator=g).bfloat16()
    gamma = torch.full((H,), 0.693, device=dev)
    beta = torch.zeros(H, device=dev) if spec.mode == "faithful" else None
    mass = F.softplus(torch.randn(B, T, device=dev, generator=g))
    r2 = torch.tensor(4.018**2, device=dev)
    return [t.requires_grad_() if t is not None else None for t in (zh, v, gamma, beta, mass, r2)]


def step(fn, spec: GravityScore, ins: list, w: torch.Tensor, p: float = 0.0):
    zh, v, gamma, beta, mass, r2 = ins
    out = fn(zh, v, spec, gamma, beta, mass, r2, p)
    leaves = [t for t in ins if t is not None]
    grads = torch.autograd.grad((out.float() * w).sum(), leaves, allow_unused=True)
    return out, grads


def gpu_ms(fn, n: int = 5) -> float:
    """Mean device time of the kernels one call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(getattr(e, "device_time_total", 0) for e in prof.key_averages()) / n / 1e3


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, p: float = 0.0):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    return torch.autograd.grad((out.float() * w).sum(), [q, k, v])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--c", type=int, default=16, help="per-head coordinate width c_h")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0, help="also time the Triton kernels and SDPA with this dropout")
    a = ap.parse_args()
    if not 0.0 <= a.dropout < 1.0:
        ap.error(f"--dropout must be in [0, 1), not {a.dropout}")
    if not torch.cuda.is_available():
        sys.exit("gravity_kernel.py: needs a CUDA GPU (none found); nothing to time")
    if not gt.triton_available:
        sys.exit("gravity_kernel.py: needs triton (not importable); nothing to time")
    B, H, T, d, c = a.batch, a.heads, a.T, a.d, a.c
    print(f"device: {describe_device(torch.device('cuda'))}; B {B} H {H} T {T} d {d} c_h {c}; bf16 v", flush=True)
    w = torch.randn(B, H, T, d, device="cuda")
    q, k, vq = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fns = {"causal SDPA": lambda: sdpa(q, k, vq, w)}
    errs = {}
    for label, spec in CONFIGS.items():
        ins = inputs(spec, B, H, T, d, c)
        ref, ref_g = step(compiled_materialised, spec, ins, w)
        out, out_g = step(gt.gravity_triton, spec, ins, w)
        ins32 = [t.detach().float().requires_grad_() if t is not None else None for t in ins]
        r32, r32_g = step(compiled_materialised, spec, ins32, w)
        names = [n for n, t in zip(NAMES, ins) if t is not None]

        def err(a, b, c):
            if a is None or b is None:
                return "-"
            return f"{(a.float() - b.float()).abs().max().item():.1e} [{(b.float() - c.float()).abs().max().item():.1e}]"

        errs[label] = {"out": err(out, ref, r32), **{n: err(x, y, z) for n, x, y, z in zip(names, out_g, ref_g, r32_g)}}
        fns[f"{label} materialised (compiled)"] = lambda spec=spec, ins=ins: step(compiled_materialised, spec, ins, w)
        fns[f"{label} triton"] = lambda spec=spec, ins=ins: step(gt.gravity_triton, spec, ins, w)
        if a.dropout > 0:
            fns[f"{label} triton, dropout {a.dropout}"] = (
                lambda spec=spec, ins=ins: step(gt.gravity_triton, spec, ins, w, a.dropout))
    if a.dropout > 0:
        fns[f"causal SDPA, dropout {a.dropout}"] = lambda: sdpa(q, k, vq, w, a.dropout)
    res = time_interleaved(fns, torch.device("cuda"), warmup=a.warmup, iters=a.iters)
    gpu = {name: gpu_ms(fn) for name, fn in fns.items() if not res[name].error}
    rows = []
    for name, r in res.items():
        label = name.split(" ")[0]
        mat = f"{label} materialised (compiled)"
        ratio = (lambda x, y: fmt(x / y, ".2f") + "x" if x and y else "")  # noqa: E731
        rows.append([name, fmt(r.ms), fmt(gpu.get(name)), ratio(gpu.get(name), gpu.get("causal SDPA")),
                     ratio(gpu.get(name), gpu.get(mat)) if "triton" in name else "", r.error or ""])
    print()
    print(table(["candidate (fwd + bwd)", "wall ms", "GPU ms", "GPU vs SDPA", "GPU vs materialised", "error"],
                rows, "lrrrrl"))
    print()
    cols = ["out", *NAMES]
    erows = [[label] + [e.get(n, "") for n in cols] for label, e in errs.items()]
    print(table(["max abs err vs materialised [bf16 vs fp32 v]", *cols], erows))


if __name__ == "__main__":
    main()
