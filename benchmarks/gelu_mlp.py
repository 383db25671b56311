"""The GELU MLP alone on one GPU: GELU as its own kernels (compiled) against GELU inside cuBLASLt's
matmul epilogues (``components/ffn/_gelu_mlp.py``), forward + backward, in one run.

GPT-2 124M's MLP by default: 32 x 1024 tokens, 768 -> 3072 -> 768, bf16 autocast, fp32 weights.
Also checks that the fused output and gradients are as close to fp32 as the unfused bf16 ones.

    python benchmarks/gelu_mlp.py [--tokens 32768] [--dim 768] [--hidden 3072] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import kernel_times  # noqa: E402

from physlm_graph.components.ffn import _gelu_mlp  # noqa: E402
from physlm_graph.components.ffn.mlp import MLP  # noqa: E402


def host_ms(fn, n: int = 20) -> float:
    """Host time per call while the GPU queue has room: the CPU cost of launching one step."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)


def profile(name: str, fn, n: int = 5) -> None:
    fn()
    rows = kernel_times(fn, n)
    print(f"{name}: {sum(r[0] for r in rows):.3f} ms of kernels per step")
    for ms, _, key in rows[:8]:
        print(f"    {ms:7.3f} ms  {key[:110]}")


def column_sums(args) -> None:
    """The bias gradients are column sums of (tokens, width) bf16 matrices: three ways to take them."""
    print("| column sums of a (tokens, width) bf16 matrix | sum(0) ms | mv with ones ms | fp32 sum(0) of a bf16 view ms |")
    print("|---|---:|---:|---:|")
    for width in (args.hidden, args.dim):
        a = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16)
        ones = torch.ones(args.tokens, device="cuda", dtype=torch.bfloat16)
        t_sum = timed(lambda: a.sum(0), args.iters)
        t_mv = timed(lambda: torch.mv(a.t(), ones), args.iters)
        t_f = timed(lambda: a.sum(0, dtype=torch.float32), args.iters)
        torch.testing.assert_close(torch.mv(a.t(), ones).float(), a.float().sum(0), rtol=2e-2, atol=2.0)
        print(f"| ({args.tokens}, {width}) | {t_sum:.3f} | {t_mv:.3f} | {t_f:.3f} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="also list each variant's GPU kernels (ms per step)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gelu_mlp.py: needs a CUDA GPU (none found); nothing to time")
    if not _gelu_mlp.AVAILABLE:
        sys.exit("gelu_mlp.py: cuBLASLt not found in this torch build (or PHYSLM_FUSED_GELU=0)")
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device="cuda", requires_grad=True)
    dy = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16)
    mods, options = {}, {}
    for name, approx, fused, opts in [
            ("exact GELU, own kernels", "none", False, {}),
            ("tanh GELU, own kernels", "tanh", False, {}),
            ("tanh GELU in the epilogues", "tanh", True, {}),
            ("same, cuBLASLt heuristic's first algorithm (no timed choice)", "tanh", True, {"timed_choice": False}),
            ("same as 3rd, db1 in the DGELU epilogue", "tanh", True, {"bgrad_epilogue": True}),
            ("same as 3rd, all matmuls cuBLASLt, timed choice", "tanh", True, {"lt_matmuls": True}),
            ("same, bias gradients in the weight gradients' epilogues", "tanh", True,
             {"lt_matmuls": True, "bgrad_wgrad": True})]:
        m = MLP(embed_dim=args.dim, hidden_dim=args.hidden, approximate=approx).cuda()
        m.fused = fused
        mods[name], options[name] = m, opts
    base = mods["tanh GELU, own kernels"]
    for m in mods.values():
        m.load_state_dict(base.state_dict())

    def step(cm):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = cm(x)
            y.backward(dy)
        return run

    # numerics: fused vs unfused bf16, both against fp32
    res = {}
    for name in ("tanh GELU, own kernels", "tanh GELU in the epilogues"):
        m = mods[name]
        m.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.backward(dy)
        res[name] = [y.float(), x.grad.clone(), m.fc.weight.grad.clone(), m.fc.bias.grad.clone(),
                     m.proj.weight.grad.clone(), m.proj.bias.grad.clone()]
    m = base
    m.zero_grad()
    x.grad = None
    y = F.linear(F.gelu(F.linear(x, m.fc.weight, m.fc.bias), approximate="tanh"), m.proj.weight, m.proj.bias)
    y.backward(dy.float())
    ref = [y, x.grad.clone(), m.fc.weight.grad, m.fc.bias.grad, m.proj.weight.grad, m.proj.bias.grad]
    print("| tensor | unfused bf16: max abs err vs fp32 | fused: max abs err vs fp32 | max abs fp32 |")
    print("|---|---:|---:|---:|")
    for i, t in enumerate(["y", "dx", "dW1", "db1", "dW2", "db2"]):
        e_u = (res["tanh GELU, own kernels"][i] - ref[i]).abs().max().item()
        e_f = (res["tanh GELU in the epilogues"][i] - ref[i]).abs().max().item()
        print(f"| {t} | {e_u:.3g} | {e_f:.3g} | {ref[i].abs().max().item():.3g} |")
    print()
    times, host = {}, {}
    for name, m in mods.items():
        x.grad = None
        _gelu_mlp.OPTIONS.update({"bgrad_epilogue": False, "lt_matmuls": False, "bgrad_wgrad": False,
                                  "timed_choice": True}, **options[name])
        _gelu_mlp._lt().plans.clear()  # each split chooses its algorithms afresh
        compiled = step(torch.compile(m))
        times[name] = timed(compiled, args.iters)
        host[name] = host_ms(compiled)
        if args.profile:
            profile(name, step(torch.compile(m)))
    if args.profile:
        column_sums(args)
    ref_t = times["tanh GELU, own kernels"]
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; MLP {args.dim} -> {args.hidden} -> "
          f"{args.dim}, {args.tokens} tokens, bf16 autocast, compiled, forward + backward")
    print()
    print("| MLP | ms | vs tanh, own kernels | host ms to launch |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {t / ref_t:.2f}x | {host[name]:.3f} |")
    best = min((n for n in times if mods[n].fused), key=times.get)
    print()
    print(f"fastest fused split: {best!r}; options: {','.join(k for k, v in options[best].items() if v) or 'none'}")


if __name__ == "__main__":
    main()
