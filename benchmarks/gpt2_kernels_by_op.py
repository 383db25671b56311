"""Which operator launched each GPU kernel of a GPT-2 124M training step (one GPU).

``gpt2_speed.py --profile`` groups kernels by name; this script attributes them to the operator
that launched them (an aten op, a physlm_graph custom op, or an inductor kernel), which is how
the LayerNorm backward's separate bf16 casts and its eager partial sums were found (2026-11-23,
with ``--residual keep``: an fp32 residual stream, the blueprint's default until commit 86f4393).
The blueprint's model as ``gpt2_speed.py`` times it: bf16 autocast, ``torch.compile`` (default
mode), head + loss fused, the MLP's GELU in cuBLASLt's epilogues, cuDNN attention, fused AdamW.

    python benchmarks/gpt2_kernels_by_op.py [--steps 2] [--top 60]

Prints ms per step by (operator, kernel), then every eager ``aten::sum`` / ``aten::fill_`` by the
chain of operators above it and by input shape (work the compiled graph hands back to eager torch).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt2_speed as G  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after 4 warm-up steps)")
    ap.add_argument("--top", type=int, default=60, help="rows of the (operator, kernel) table")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--residual", choices=("keep", "autocast"), default="autocast",
                    help="params.residual: autocast (bf16 stream, the blueprint's default) or keep (fp32 stream, "
                         "the numerics diagnosed on 2026-11-23)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpt2_kernels_by_op.py: needs a CUDA GPU (none found)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = G.blueprint_gpt2(50304, "tanh", args.residual, True, "cuda").module.train()
    step = G.make_step(model, G.optimizer(model), True, "default", True, fused=True)
    x = torch.randint(0, 50304, (args.batch, 1024), device="cuda")
    y = torch.randint(0, 50304, (args.batch, 1024), device="cuda")
    with G.sdpa_context("cudnn"):
        for _ in range(4):
            step(x, y)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(args.steps):
                step(x, y)
            torch.cuda.synchronize()
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    eager, shapes = Counter(), Counter()
    for e in prof.events():
        for k in getattr(e, "kernels", []):
            by_op[(e.name[:60], k.name[:70])] += k.duration / args.steps / 1e3
        if e.name in ("aten::sum", "aten::fill_"):
            chain, p = [], e.cpu_parent
            while p is not None and len(chain) < 4:
                chain.append(p.name[:48])
                p = p.cpu_parent
            eager[(e.name, " <- ".join(chain))] += 1
            if e.name == "aten::sum":
                shapes[str(e.input_shapes)] += 1
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x 1024, "
          f"{args.steps} profiled steps\n")
    print("| ms/step | operator | kernel |\n|---:|---|---|")
    for (op, kernel), ms in sorted(by_op.items(), key=lambda t: -t[1])[:args.top]:
        print(f"| {ms:.3f} | {op} | {kernel} |")
    print("\neager aten::sum / aten::fill_ per step, by the operators above them:")
    for (name, chain), n in eager.most_common():
        print(f"  {n / args.steps:g} x {name} <- {chain}")
    print("aten::sum input shapes per step:")
    for shape, n in shapes.most_common():
        print(f"  {n / args.steps:g} x {shape}")


if __name__ == "__main__":
    main()
