"""Every sequence mixer's forward + backward time against causal SDPA (attention.causal).

    python benchmarks/attention.py [--batch 16] [--T 512] [--width 512] [--heads 8] [--iters 30]
    python benchmarks/attention.py --small          # CPU smoke run (tiny sizes, fp32)

One module per candidate, built through the component registry (as the compiler builds it), in
training mode, attention dropout 0 (a kernel comparison), parameters fp32 under bf16 autocast
on CUDA (as a training run), input x (B, T, width) requiring grad; one call = forward + the
backward of the sum of the float outputs. Candidates are interleaved, CUDA-event timed, median
of ``--iters``; a failing candidate is reported in the table, never aborts it. Goal (H100,
B=16, T=512, width 512, 8 heads): attention.gravity fixed/gaussian <= 2x causal SDPA.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import describe_device, fmt, pick_device, table, time_interleaved  # noqa: E402

from physlm_graph import Example  # noqa: E402
from physlm_graph.testing import build_example  # noqa: E402

NGT = {"head_coord_dim": 16, "gamma_init": 0.0, "radius_init": 4.0, "mass_mode": "score"}


def candidates(heads: int) -> list[tuple[str, str, dict, str]]:
    """(label, component, params, input kind). Input kinds: "x" (x only), "gravity" (x, z, mass)."""
    h = {"num_heads": heads}
    return [
        ("causal SDPA (reference)", "attention.causal", h, "x"),
        ("gravity faithful, hard cutoff (NGT default)", "attention.gravity", {**h, **NGT, "mode": "faithful", "cutoff": "hard", "dropout": 0.0}, "gravity"),
        ("gravity faithful, hard, EAGER materialised", "attention.gravity", {**h, **NGT, "mode": "faithful", "cutoff": "hard", "dropout": 0.0}, "gravity-eager"),
        ("gravity fixed inverse_square, soft", "attention.gravity", {**h, **NGT, "mode": "fixed", "cutoff": "soft", "dropout": 0.0}, "gravity"),
        ("gravity fixed gaussian, soft", "attention.gravity", {**h, **NGT, "mode": "fixed", "kernel": "gaussian", "dropout": 0.0}, "gravity"),
        ("gravity fixed gaussian, soft, dropout 0.1", "attention.gravity", {**h, **NGT, "mode": "fixed", "kernel": "gaussian", "dropout": 0.1}, "gravity"),
        ("holographic faithful", "attention.holographic", {**h, "mode": "faithful", "dropout": 0.0}, "x"),
        ("holographic fixed", "attention.holographic", {**h, "mode": "fixed", "dropout": 0.0}, "x"),
        ("resonance faithful", "attention.resonance", {**h, "mode": "faithful", "dropout": 0.0}, "x"),
        ("resonance fixed", "attention.resonance", {**h, "mode": "fixed", "dropout": 0.0}, "x"),
        ("dendritic", "attention.dendritic", h, "x"),
        ("sparse_topk", "attention.sparse_topk", h, "x"),
        ("selective fixed", "attention.selective", {**h, "mode": "fixed"}, "x"),
        ("ssm.ssd (reference)", "ssm.ssd", {}, "x"),
        ("ssm.gated_conv (reference)", "ssm.gated_conv", {}, "x"),
    ]


@contextlib.contextmanager
def eager_gravity():
    """Force attention.gravity's eager materialised path (what CPU runs) on CUDA."""
    from physlm_graph.components.attention import _gravity_kernels as k
    from physlm_graph.components.attention import gravity as g

    saved = g.compiled_materialised
    g.compiled_materialised = k.gravity_materialised
    try:
        yield
    finally:
        g.compiled_materialised = saved


def make_step(name: str, params: dict, kind: str, B: int, T: int, D: int, device: torch.device,
              amp: bool, compile_: bool) -> Callable[[], None]:
    coord = 64
    shapes = {"x": (B, T, D)}
    if kind.startswith("gravity"):
        shapes |= {"z": (B, T, coord), "mass": (B, T, 1)}
    mod = build_example(name, Example(params, shapes), device=device).train()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, D, generator=g).to(device).requires_grad_(True)
    inputs = [x]
    if kind.startswith("gravity"):  # NGT-like: LayerNormed coordinates, softplus masses
        z = F.layer_norm(torch.randn(B, T, coord, generator=g), (coord,)).to(device).requires_grad_(True)
        mass = F.softplus(torch.randn(B, T, 1, generator=g)).to(device).requires_grad_(True)
        inputs += [z, mass]
    fn = torch.compile(mod) if compile_ else mod
    ctx = eager_gravity if kind == "gravity-eager" else contextlib.nullcontext
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def step() -> None:
        for t in inputs:
            t.grad = None
        mod.zero_grad(set_to_none=True)
        with ctx(), autocast():
            outs = fn(*inputs)
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs
            loss = sum(o.float().sum() for o in outs if o.is_floating_point() and o.requires_grad)
        loss.backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile each module too")
    ap.add_argument("--only", default="", help="comma-separated substrings of candidate labels to keep")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: B=2, T=64, width 64, 4 heads, fp32")
    args = ap.parse_args()
    device = pick_device()
    if args.small:
        args.batch, args.T, args.width, args.heads, args.iters, args.warmup = 2, 64, 64, 4, 5, 1
    amp = device.type == "cuda"
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    B, T, D, H = args.batch, args.T, args.width, args.heads
    cands = candidates(H)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        cands = [c for c in cands if c[0].startswith("causal") or any(k in c[0] for k in keep)]
    print(f"# attention kernels, forward + backward{' (CPU SMOKE RUN, not a measurement)' if device.type == 'cpu' else ''}")
    print(f"device: {describe_device(device)}")
    print(f"B={B}, T={T}, width={D}, heads={H}, {'bf16 autocast' if amp else 'fp32'}, train mode, attention dropout 0 "
          f"unless stated, median of {args.iters} interleaved runs after {args.warmup} warm-up"
          f"{', torch.compile per module' if args.compile else ''}", flush=True)
    fns, errors = {}, {}
    for label, name, params, kind in cands:
        try:
            fns[label] = make_step(name, params, kind, B, T, D, device, amp, args.compile)
        except Exception as e:  # noqa: BLE001
            errors[label] = f"build: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    res = time_interleaved(fns, device, warmup=args.warmup, iters=args.iters)
    ref = res.get(cands[0][0])
    ref_ms = ref.ms if ref is not None else None
    rows = []
    for label, name, _, _ in cands:
        r = res.get(label)
        err = errors.get(label) or (r.error if r else None)
        ms = r.ms if r else None
        ratio = f"{ms / ref_ms:.2f}x" if ms and ref_ms else "-"
        goal = ""
        if "gravity fixed gaussian, soft" == label and ms and ref_ms and device.type == "cuda":
            goal = "<= 2x: " + ("ok" if ms / ref_ms <= 2 else "MISSED")
        peak = fmt(r.peak_mb, ".0f") if r and r.peak_mb is not None else "-"
        rows.append([label, f"`{name}`", fmt(ms), ratio, peak, goal, f"FAILED ({err})" if err else ""])
    print()
    print(table(["candidate", "component", "ms fwd+bwd", "vs causal SDPA", "peak MiB", "goal", "note"], rows,
                "llrrrll"))


if __name__ == "__main__":
    main()
