"""Where a seed model's training step spends its GPU time: the top CUDA kernels of one
compiled step, for the models of ``seed_speed.py``, side by side with the vanilla GPT.

    python benchmarks/profile_seed.py --only "NGT gravity faithful,holographic faithful" [--rows 15]

Each model is compiled, warmed up, then 5 steps run under ``torch.profiler``; the table lists
the kernels with the most total CUDA time per step (names shortened), so a change to a seed
component can be aimed at what costs. A diagnosis tool, not a goal check (see seed_speed.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seed_speed import SIZES, make_step, models  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated substrings of model labels (vanilla GPT always)")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fused-loss", action="store_true", help="compile the loss with the model, as train --compile does")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_seed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    P = dict(SIZES, context=512)
    keep = [s.strip() for s in args.only.split(",") if s.strip()]
    for label, group, bp, _ in models(P, {**P, "context": 1024}):
        if group != "vanilla" or not (label == "vanilla GPT" or any(k in label for k in keep)):
            continue
        torch._dynamo.reset()
        step, _ = make_step(bp, 16, 512, dev, True, True, fused_loss=args.fused_loss)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) / args.steps / 1e3
        print(f"\n## {label}: {total:.2f} ms of CUDA kernels per step")
        print(f"{'ms/step':>8} {'share':>6} {'calls':>6}  kernel")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]:
            ms = e.self_device_time_total / args.steps / 1e3
            print(f"{ms:8.3f} {100 * ms / total:5.1f}% {e.count // args.steps:6d}  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
