"""Generation speed with and without the KV cache on a baby-gpt-sized model (CPU by default).

    python benchmarks/kv_cache.py [--new-tokens 256] [--prompt 64] [--context 512] [--rounds 3] [--threads N]

The two paths run interleaved (cache, recompute, cache, ...) so machine noise hits both alike;
the table shows the median of each and the speedup. The context is long enough that nothing
is cropped, and greedy decoding checks that both paths produce the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from physlm_graph import compile_blueprint
from physlm_graph.runtime.generate import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert args.prompt + args.new_tokens <= args.context, "the benchmark must not crop"
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", device=args.device, overrides={
        "params.context": args.context, "train.seq_len": args.context, "params.dropout": 0.0})
    prompt = torch.randint(0, 65, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(max_new_tokens=args.new_tokens, temperature=0)
    assert generate(cm, prompt, use_cache=True, **kw) == generate(cm, prompt, use_cache=False, **kw)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for cached in (True, False):
            t0 = time.perf_counter()
            generate(cm, prompt, use_cache=cached, **kw)
            times[cached].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    t = Table(title=f"KV cache: baby-gpt ({cm.num_params / 1e6:.2f}M params, context {args.context}), prompt "
              f"{args.prompt}, {args.new_tokens} new tokens, {args.device}, {torch.get_num_threads()} threads, "
              f"median of {args.rounds}")
    for col in ("path", "seconds", "tokens/s", "ms/token", "speedup"):
        t.add_column(col, justify="right" if col != "path" else "left")
    for cached, name in ((False, "recompute"), (True, "KV cache")):
        s = med[cached]
        t.add_row(name, f"{s:.2f}", f"{args.new_tokens / s:,.0f}", f"{1000 * s / args.new_tokens:.1f}",
                  f"{med[False] / s:.2f}x")
    Console().print(t)


if __name__ == "__main__":
    main()
