"""What does compiling a blueprint cost at run time? The compiled baby-gpt against an
independent hand-written PyTorch GPT (nanoGPT's structure) loaded with the same weights.

Checks that the logits agree (max abs diff <= 1e-6 in fp32) and times forward+backward steps
of the two models interleaved (A, B, A, B, ...), reporting the medians and their ratio
(goal: within 3%).

    python benchmarks/overhead.py [--steps 30] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from physlm_graph import compile_blueprint

from _handgpt import HandGPT  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]


def copy_weights(gm: nn.Module, hand: HandGPT, layers: int) -> None:
    sd = gm.state_dict()
    mapping = {"wte.weight": "tok.weight", "wpe.weight": "pos.weight", "ln_f.weight": "norm.weight"}
    for i in range(layers):
        for a, b in (("ln_1.weight", "ln1.weight"), ("attn.c_attn.weight", "attn.qkv.weight"),
                     ("attn.c_proj.weight", "attn.proj.weight"), ("ln_2.weight", "ln2.weight"),
                     ("c_fc.weight", "mlp.fc.weight"), ("c_proj.weight", "mlp.proj.weight")):
            mapping[f"h.{i}.{a}"] = f"trunk.{i}.{b}"
    with torch.no_grad():
        for k, v in hand.state_dict().items():
            if k == "lm_head.weight":
                continue
            v.copy_(sd[mapping[k]])


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool) -> float:
    t0 = time.perf_counter()
    out = model(x)
    logits = out["logits"] if compiled else out
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    cm = compile_blueprint(ROOT / "blueprints/baby-gpt.yaml", overrides={"params.dropout": 0.0}, device=args.device)
    gm = cm.module
    p = cm.resolved.params
    hand = HandGPT(p["vocab"], p["context"], p["dim"], p["heads"], p["layers"], bias=False).to(args.device)
    copy_weights(gm, hand, p["layers"])
    x = torch.randint(0, p["vocab"], (args.batch, args.seq), device=args.device)
    y = torch.randint(0, p["vocab"], (args.batch, args.seq), device=args.device)
    with torch.no_grad():
        diff = (gm(x)["logits"] - hand(x)).abs().max().item()
    times: dict[str, list[float]] = {"physlm-graph": [], "hand-written": []}
    for _ in range(3):  # warm-up
        step_time(gm, x, y, True)
        step_time(hand, x, y, False)
    for i in range(args.steps):
        order = [("physlm-graph", gm, True), ("hand-written", hand, False)]
        if i % 2:
            order.reverse()
        for name, model, compiled in order:
            model.zero_grad(set_to_none=True)
            times[name].append(step_time(model, x, y, compiled))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = med["physlm-graph"] / med["hand-written"]
    print(f"baby-gpt ({cm.num_params:,} params), batch {args.batch} x {args.seq}, device {args.device}, "
          f"{args.steps} interleaved fwd+bwd steps, torch {torch.__version__}")
    print()
    print("| model | median step (ms) |")
    print("|---|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    print()
    print(f"max |logits diff| (fp32): {diff:.2e}   (goal <= 1e-6: {'ok' if diff <= 1e-6 else 'FAIL'})")
    print(f"step-time ratio physlm-graph / hand-written: {ratio:.3f}   "
          f"(goal within 3%: {'ok' if abs(ratio - 1) <= 0.03 else 'FAIL'})")
    if not math.isfinite(diff):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
