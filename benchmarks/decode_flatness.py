"""Is the time per generated token flat? Cached generation of every fixed seed blueprint on CPU.

    python benchmarks/decode_flatness.py [--tokens 1000] [--threads N] [--seed-name NAME ...] [--set KEY=VALUE ...]

Each fixed seed blueprint is built small (2 layers, width 128, a 512-token vocabulary; the
mixers and wiring are the seed's) with a context long enough that nothing is cropped, and
generates ``--tokens`` greedy tokens after an 8-token prompt with the decode cache
(``use_cache=True``: it fails if a node cannot decode incrementally). The time of each token
is taken when ``on_token`` sees it; the table gives the median time per token over tokens
100-200 and 900-1000 and their ratio. With incremental decoding a token's cost grows only with
the attention over the cached keys, so the ratio should stay near 1 (goal: within 1.3x);
recomputing the whole context for every token would make it about 5x-10x.
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
SEEDS = ["brain-gpt-v1-small-fixed", "brain-gpt-v2-fixed", "holographic-v2-fixed", "ngt-25m-fixed", "qllm-fixed"]
COMMON = {"vocab": 512, "dim": 128, "heads": 4, "layers": 2}
EXTRA = {  # each seed's own size knobs, scaled down with the width
    "brain-gpt-v1-small-fixed": {"dendrites": 4, "columns": 4, "column_size": 32},
    "brain-gpt-v2-fixed": {"heads": 2, "dropout": 0.0},  # ssm.ssd's head_dim 64 divides 2 x 128
    "holographic-v2-fixed": {"hidden": 256, "dropout": 0.0, "experts": 2},
    "ngt-25m-fixed": {"coord": 16, "hidden": 256, "dropout": 0.0},
    "qllm-fixed": {"hidden": 256, "base_dim": 16, "memory": 16, "dropout": 0.0},
}


def per_token(stamps: list[float], a: int, b: int) -> float:
    """Median seconds per token over generated tokens a .. b (1-based: stamps[n - 1] is token n);
    the median, not the mean, so that a burst of load from other processes does not decide it."""
    return statistics.median(stamps[n] - stamps[n - 1] for n in range(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--seed-name", nargs="*", default=SEEDS)
    ap.add_argument("--set", nargs="*", default=[], help="extra params overrides, KEY=VALUE (e.g. layers=4)")
    args = ap.parse_args()
    if args.tokens < 1000:
        raise SystemExit("--tokens must be at least 1000 (the second window is tokens 900-1000)")
    torch.set_num_threads(args.threads)
    con = Console()
    table = Table(title=f"cached greedy generation on CPU ({torch.get_num_threads()} threads), "
                        f"{args.tokens} tokens after an 8-token prompt", title_justify="left")
    for c in ("seed", "params", "ms/token 100-200", "ms/token 900-1000", "ratio"):
        table.add_column(c, justify="left" if c == "seed" else "right")
    for name in args.seed_name:
        params = {**COMMON, **EXTRA.get(name, {}), "context": args.tokens + 64}
        params.update(dict(kv.split("=", 1) for kv in args.set))
        cm = compile_blueprint(ROOT / "blueprints" / "seeds" / f"{name}.yaml",
                               overrides={f"params.{k}": v for k, v in params.items()})
        prompt = torch.randint(0, int(params["vocab"]), (1, 8), generator=torch.Generator().manual_seed(0))
        stamps: list[float] = []
        generate(cm, prompt, max_new_tokens=args.tokens, temperature=0, use_cache=True,
                 on_token=lambda _ids: stamps.append(time.perf_counter()))
        early, late = per_token(stamps, 100, 200), per_token(stamps, 900, 1000)
        table.add_row(name, f"{cm.num_params:,}", f"{early * 1e3:.2f}", f"{late * 1e3:.2f}", f"{late / early:.2f}x")
        con.print(f"{name}: {early * 1e3:.2f} -> {late * 1e3:.2f} ms/token ({late / early:.2f}x)")
    con.print(table)


if __name__ == "__main__":
    main()
