"""What attention.causal's family features cost: forward + backward of each against plain causal SDPA.

    python benchmarks/attention_features.py [--batch 8] [--T 2048] [--width 1024] [--heads 8] [--kv-heads 2]
    python benchmarks/attention_features.py --smoke     # CPU, tiny sizes, fp32: checks that it runs

One ``attention.causal`` module per candidate, built through the registry as the compiler builds it,
training mode, fp32 parameters under bf16 autocast on CUDA, x (B, T, width) requiring grad; one call =
forward + backward of the output's sum. Interleaved, CUDA-event timed, median of ``--iters``.
The window is T / 4 (a window that covers T is plain causal attention and costs nothing). The
soft-capped rows run outside SDPA (it has no score hook): their cost against the first row is
what Gemma 2's attention pays here; the QK-norm rows add two small norms.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import describe_device, fmt, pick_device, table, time_interleaved  # noqa: E402

from physlm_graph import Example  # noqa: E402
from physlm_graph.testing import build_example  # noqa: E402


def candidates(T: int) -> dict[str, dict]:
    w = max(T // 4, 1)
    return {
        "causal SDPA (reference)": {},
        f"sliding_window {w} (Mistral)": {"sliding_window": w},
        "softcap 50 (Gemma 2 global)": {"softcap": 50.0},
        f"softcap 50 + window {w} (Gemma 2 local)": {"softcap": 50.0, "sliding_window": w},
        "qk_norm rms_head (Qwen3)": {"qk_norm": "rms_head"},
        "qk_norm rms_proj (OLMo 2)": {"qk_norm": "rms_proj"},
    }


def make_step(params: dict, B: int, T: int, D: int, device: torch.device, amp: bool) -> Callable[[], None]:
    mod = build_example("attention.causal", Example(params, {"x": (B, T, D)}), device=device).train()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)

    def step() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = mod(x)
        y.float().sum().backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, fp32")
    args = ap.parse_args()
    device = torch.device("cpu") if args.smoke else pick_device()
    if args.smoke:
        args.batch, args.T, args.width, args.heads, args.kv_heads, args.iters = 2, 64, 64, 4, 2, 3
    amp = device.type == "cuda"
    base = {"num_heads": args.heads, "num_kv_heads": args.kv_heads, "bias": False}
    fns = {name: make_step({**base, **p}, args.batch, args.T, args.width, device, amp)
           for name, p in candidates(args.T).items()}
    print(f"{describe_device(device)}; B={args.batch}, T={args.T}, width={args.width}, heads={args.heads}/"
          f"{args.kv_heads} kv, {'bf16 autocast' if amp else 'fp32'}, forward + backward, median of {args.iters}")
    res = time_interleaved(fns, device, iters=args.iters, verbose=False)
    ref = res["causal SDPA (reference)"].ms
    rows = [[name, fmt(r.ms), fmt(r.ms / ref if r.ms and ref else None, ".2f") + "x", fmt(r.peak_mb, ".0f"),
             r.error or ""] for name, r in res.items()]
    print(table(["candidate", "ms", "vs SDPA", "peak MB (warm-up)", "error"], rows, align="lrrrl"))


if __name__ == "__main__":
    main()
