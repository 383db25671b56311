"""Benchmark the chunked SSD scan against a sequential time-step scan (and, on CUDA, SDPA), and
Mamba-1's chunked selective scan against its token-by-token recurrence.

    python benchmarks/ssm.py [--T 1024] [--batch 2] [--embed-dim 256] [--runs 5] [--threads N] [--profile]
                             [--only ssd|mamba1] [--smoke]

1. CPU (always; and on CUDA if present): the chunked SSD kernel (``ssm.ssd``'s scan) in both
   layouts (``folded``, what ``ssm.ssd`` runs on CPU; ``head_major``, what it runs on CUDA), eager
   and through ``torch.compile`` (as ``train --compile`` runs it), vs the same recurrence as a
   Python loop over t, with identical inputs taken from an ``ssm.ssd`` module's projections;
   timings interleaved, median of ``--runs``; prints the speedups and the max abs
   differences. Goal: >= 50x at T = 1024.
2. CUDA only: the whole ``ssm.ssd`` mixer vs causal SDPA attention (qkv + out projections,
   same width) at T = 1024, forward + backward in bf16, per token. Goal: SSD <= 2x attention.
3. ``--only mamba1`` or both (CPU; and CUDA if present): ``ssm.mamba``'s scan, chunks side by
   side (``selective_scan_chunked``, what the mixer runs), vs the token-by-token recurrence
   (``selective_scan``, the reference), fp32, identical inputs from an ``ssm.mamba`` module's
   projections (Di = 2 * embed-dim, N = 16); forward alone (no grad) and forward + backward;
   timings interleaved, median of ``--runs``; prints the ratio and the max differences.

``--smoke``: T = 64, B = 1, D = 32, one run, no torch.compile: checks that the script runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from physlm_graph import Example  # noqa: E402
from physlm_graph.components.ssm._mamba_kernels import (  # noqa: E402
    default_chunk_len,
    selective_scan,
    selective_scan_chunked,
)
from physlm_graph.components.ssm._ssd_kernels import ssd_chunked  # noqa: E402
from physlm_graph.testing import build_example  # noqa: E402


def sequential_scan(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, one Python step per token."""
    b, T, H, P = x.shape
    h = x.new_zeros(b, H, P, B.shape[-1])
    B, C = B.expand(b, T, H, B.shape[-1]), C.expand(b, T, H, C.shape[-1])  # share the one group
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)  # (b, H)
        h = h * decay[..., None, None] + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], runs: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, alternating between them so drift hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def scan_inputs(T: int, batch: int, embed_dim: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """(x, dt, A, B, C) as an ``ssm.ssd`` module produces them for random input."""
    ex = Example({}, {"x": (batch, T, embed_dim)})
    m = build_example("ssm.ssd", ex, device=device)
    u = torch.randn(batch, T, embed_dim, device=device)
    H, P, N, Di = m.num_heads, m.head_dim, m.d_state, m.d_inner
    with torch.no_grad():
        _, xbc, dt = torch.split(m.in_proj(u), [Di, Di + 2 * N, H], dim=-1)
        xbc, _ = m._conv(xbc, None)
        x, B, C = torch.split(F.silu(xbc), [Di, N, N], dim=-1)
        x = x.reshape(batch, T, H, P)
        B = B.reshape(batch, T, 1, N)  # one group
        C = C.reshape(batch, T, 1, N)
        dt = F.softplus(dt + m.dt_bias)
        A = -torch.exp(m.A_log)
    return [t.to(dtype) for t in (x, dt, A, B, C)], m.chunk_size


def profile_scan(fn: Callable[[], object], rows: int = 12) -> None:
    """Where the compiled scan spends its CPU time: torch.profiler over 20 calls, inductor's
    kernels named (cpp.enable_kernel_profile), sorted by self time."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(20):
            fn()
    print("\nprofile of the compiled scan (20 calls; the sum is the total, divide by 20 per call):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def bench_scan(T: int, batch: int, embed_dim: int, runs: int, device: torch.device, compiled: bool = False,
               prof: bool = False) -> None:
    (x, dt, A, B, C), chunk = scan_inputs(T, batch, embed_dim, device)
    default = "folded" if device.type == "cpu" else "head_major"  # what ssm.ssd runs on this device
    layouts = [default] + [k for k in ("folded", "head_major") if k != default]
    with torch.no_grad():
        fns: dict[str, Callable[[], object]] = {"sequential": lambda: sequential_scan(x, dt, A, B, C)}
        for lay in layouts:
            fns[f"SSD {lay}"] = lambda lay=lay: ssd_chunked(x, dt, A, B, C, chunk_size=chunk, layout=lay)
        if compiled:  # the same function through torch.compile (inductor's C++/OpenMP or Triton code)
            if prof and device.type == "cpu":
                import torch._inductor.config as inductor_config

                inductor_config.cpp.enable_kernel_profile = True  # name the generated kernels in the profile
            for lay in layouts:
                try:
                    ssd_c = torch.compile(ssd_chunked, dynamic=False)
                    ssd_c(x, dt, A, B, C, chunk_size=chunk, layout=lay)
                    fns[f"SSD {lay}, compiled"] = lambda f=ssd_c, lay=lay: f(x, dt, A, B, C, chunk_size=chunk, layout=lay)
                except Exception as e:  # noqa: BLE001 (no C++ compiler, ...): say so and time the rest
                    print(f"(torch.compile of the scan failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    break
        med = time_interleaved(fns, runs, device)
        seq = sequential_scan(x, dt, A, B, C)
        if prof and f"SSD {default}, compiled" in fns:
            profile_scan(fns[f"SSD {default}, compiled"])
        diffs = {k: (fn()[0] - seq).abs().max().item() for k, fn in fns.items() if k != "sequential"}
    H, P = x.shape[2], x.shape[3]
    print(f"\nSSD scan, {device.type}, fp32, B={batch} T={T} D={embed_dim} (H={H}, P={P}, N={B.shape[-1]}, chunk={chunk}), "
          f"median of {runs}, {torch.get_num_threads()} threads")
    print(f"{'method':<28}{'ms':>10}{'speedup':>10}{'max abs diff':>14}")
    for k, s in med.items():
        d = f"{diffs[k]:.1e}" if k in diffs else "-"
        print(f"{k:<28}{s * 1e3:>10.2f}{med['sequential'] / s:>9.1f}x{d:>14}")
    print(f"(goal: speedup >= 50x; ssm.ssd runs the {default} layout on {device.type})")


class CausalAttention(nn.Module):
    """The attention mixer being compared: qkv projection, causal SDPA, output projection."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, x):
        b, T, D = x.shape
        q, k, v = self.qkv(x).view(b, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, T, D))


def bench_vs_attention(T: int, batch: int, embed_dim: int, runs: int, device: torch.device) -> None:
    import functools

    from physlm_graph.components.ssm import ssd as ssd_module

    ssd = build_example("ssm.ssd", Example({}, {"x": (batch, T, embed_dim)}), device=device).to(torch.bfloat16)
    attn = CausalAttention(embed_dim, max(1, embed_dim // 64)).to(device, torch.bfloat16)
    x = torch.randn(batch, T, embed_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    scan = ssd_module.ssd_chunked

    def step(m, layout=None):
        def run():
            ssd_module.ssd_chunked = functools.partial(scan, layout=layout) if layout else scan
            try:
                m(x).float().square().mean().backward()
            finally:
                ssd_module.ssd_chunked = scan
        return run

    fns = {"ssm.ssd": step(ssd), "causal SDPA": step(attn)}
    for layout in ("head_major", "folded"):
        fns[f"ssm.ssd {layout}"] = step(ssd, layout)
    med = time_interleaved(fns, runs, device)
    tokens = batch * T
    print(f"\nmixer fwd+bwd, {device.type} bf16, B={batch} T={T} D={embed_dim}, median of {runs}")
    print(f"{'mixer':<22}{'us/token':>12}{'vs attention':>14}")
    for k, s in med.items():
        print(f"{k:<22}{s / tokens * 1e6:>12.3f}{s / med['causal SDPA']:>13.2f}x")
    print(f"SSD / attention: {med['ssm.ssd'] / med['causal SDPA']:.2f}x   (goal: <= 2x; ssm.ssd = its default layout on {device.type})")


def mamba_scan_inputs(T: int, batch: int, embed_dim: int, device: torch.device):
    """(dt, A, B, C, x, h0) as an ``ssm.mamba`` module's forward hands them to its scan, for random input."""
    m = build_example("ssm.mamba", Example({}, {"x": (batch, T, embed_dim)}), device=device)
    u = torch.randn(batch, T, embed_dim, device=device)
    with torch.no_grad():
        x, _ = m.in_proj(u).chunk(2, dim=-1)
        x, _ = m._conv(x, None)
        x = F.silu(x)
        d, B, C = torch.split(m.x_proj(x), [m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = F.softplus(m.dt_proj(d))
        A = -torch.exp(m.A_log.float())
        h0 = torch.zeros(batch, m.d_inner, m.d_state, device=device)
    return dt, A, B, C, x, h0


def bench_mamba_scan(T: int, batch: int, embed_dim: int, runs: int, device: torch.device) -> None:
    args = mamba_scan_inputs(T, batch, embed_dim, device)
    leaves = [t.clone().requires_grad_() for t in args[:5]] + [args[5]]
    w = torch.randn_like(args[4])

    def fwd(scan):
        with torch.no_grad():
            return scan(*args)

    def fwd_bwd(scan):
        y, h = scan(*leaves)
        return torch.autograd.grad((y * w).sum(), leaves[:5])

    fns = {"sequential fwd": lambda: fwd(selective_scan), "chunked fwd": lambda: fwd(selective_scan_chunked),
           "sequential fwd+bwd": lambda: fwd_bwd(selective_scan),
           "chunked fwd+bwd": lambda: fwd_bwd(selective_scan_chunked)}
    med = time_interleaved(fns, runs, device)
    (y_seq, h_seq), (y_chk, h_chk) = fwd(selective_scan), fwd(selective_scan_chunked)
    g_seq, g_chk = fwd_bwd(selective_scan), fwd_bwd(selective_scan_chunked)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    diffs = {"chunked fwd": f"y {rel(y_chk, y_seq):.1e}, h {rel(h_chk, h_seq):.1e}",
             "chunked fwd+bwd": "grads " + f"{max(rel(a, b) for a, b in zip(g_chk, g_seq)):.1e}"}
    Di, N = args[4].shape[-1], args[1].shape[-1]
    print(f"\nMamba-1 selective scan, {device.type}, fp32, B={batch} T={T} D={embed_dim} (Di={Di}, N={N}, "
          f"chunk={default_chunk_len(T, batch * Di * N, device.type)}), median of {runs}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<22}{'ms':>10}{'speedup':>10}   max diff / max |reference|")
    for k, s in med.items():
        base = med["sequential fwd+bwd" if "bwd" in k else "sequential fwd"]
        print(f"{k:<22}{s * 1e3:>10.2f}{base / s:>9.1f}x   {diffs.get(k, '-')}")
    print(f"sequential / chunked: forward {med['sequential fwd'] / med['chunked fwd']:.2f}x, "
          f"forward + backward {med['sequential fwd+bwd'] / med['chunked fwd+bwd']:.2f}x")
    full = args[4].numel() * N * 4 / 2**20  # one fp32 (B, T, Di, N) tensor, MiB
    print(f"memory, MiB: largest tensor of the forward (no grad), kept for the backward; "
          f"one (B, T, Di, N) is {full:.1f}")
    for name, scan in (("sequential", selective_scan), ("chunked", selective_scan_chunked)):
        largest, kept = largest_tensor_mb(lambda: fwd(scan)), saved_for_backward_mb(lambda: scan(*leaves))
        print(f"  {name:<12}{largest:>8.1f}{kept:>10.1f}")


def largest_tensor_mb(fn: Callable[[], object]) -> float:
    """MiB of the largest tensor any op returns while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, o.numel() * o.element_size())
            return out

    with Largest():
        fn()
    return Largest.nbytes / 2**20


def saved_for_backward_mb(fn: Callable[[], object]) -> float:
    """MiB that autograd keeps for the backward of ``fn()`` (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd scan")
    ap.add_argument("--skip-cpu", action="store_true", help="only the CUDA measurements")
    ap.add_argument("--profile", action="store_true", help="also profile the compiled CPU scan (its kernels by self time)")
    ap.add_argument("--only", choices=["ssd", "mamba1"], help="only the SSD measurements, or only Mamba-1's scan")
    ap.add_argument("--smoke", action="store_true", help="T=64, B=1, D=32, one run, no compile: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.T, args.batch, args.embed_dim, args.runs, args.no_compile = 64, 1, 32, 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    torch.manual_seed(0)
    devices = [] if args.skip_cpu else [torch.device("cpu")]
    devices += [torch.device("cuda")] if torch.cuda.is_available() else []
    if args.only != "mamba1":
        for device in devices:
            bench_scan(args.T, args.batch, args.embed_dim, args.runs, device, not args.no_compile,
                       args.profile and device.type == "cpu")
        if torch.cuda.is_available():
            bench_vs_attention(args.T, args.batch, args.embed_dim, args.runs, torch.device("cuda"))
    if args.only != "ssd":
        for device in devices:
            bench_mamba_scan(args.T, args.batch, args.embed_dim, args.runs, device)
    if not torch.cuda.is_available():
        print("\n(no CUDA: skipping the GPU measurements)")


if __name__ == "__main__":
    main()
