"""Is the time per generated token flat? Cached decoding of every fixed seed blueprint on CPU.

    python benchmarks/decode_flatness.py [--threads N] [--seed-name NAME ...] [--set KEY=VALUE ...]

Each fixed seed blueprint is built small (2 layers, width 128, a 512-token vocabulary; the
mixers and wiring are the seed's) with a context long enough that nothing is cropped. First
``generate(use_cache=True)`` makes 16 greedy tokens (it refuses a graph with a node that cannot
decode incrementally). Then two decodes run side by side, as ``generate`` runs them (the prompt
prefilled inside ``decoding()``, then one greedy token per step): one whose steps produce
tokens 100-200, one whose steps produce tokens 900-1000. Their steps alternate (a, b, a, b,
...), so a burst of load from other processes hits both alike, and the table gives the median
time per step of each and their ratio. With incremental decoding a token's cost grows only
with the attention over the cached keys, so the ratio should stay near 1 (goal: within 1.3x);
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
from physlm_graph._context import DecodeContext, decoding
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


class Decoder:
    """Greedy cached decoding as ``generate`` does it, one step at a time."""

    def __init__(self, module: torch.nn.Module, prompt: torch.Tensor) -> None:
        self.module, self.ctx = module, DecodeContext()
        with torch.inference_mode(), decoding(self.ctx):
            self.next = module(prompt)["logits"][:, -1].argmax(-1, keepdim=True)  # (1, 1)
        self.ctx.offset = prompt.shape[1]

    def step(self) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), decoding(self.ctx):
            self.next = self.module(self.next)["logits"][:, -1].argmax(-1, keepdim=True)
            self.ctx.offset += 1
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--seed-name", nargs="*", default=SEEDS)
    ap.add_argument("--set", nargs="*", default=[], help="extra params overrides, KEY=VALUE (e.g. layers=4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    con = Console()
    table = Table(title=f"cached greedy decoding on CPU ({torch.get_num_threads()} threads), median time per "
                        "token, steps interleaved", title_justify="left")
    for c in ("seed", "params", "ms/token 100-200", "ms/token 900-1000", "ratio"):
        table.add_column(c, justify="left" if c == "seed" else "right")
    for name in args.seed_name:
        params = {**COMMON, **EXTRA.get(name, {}), "context": 1100}
        params.update(dict(kv.split("=", 1) for kv in args.set))
        cm = compile_blueprint(ROOT / "blueprints" / "seeds" / f"{name}.yaml",
                               overrides={f"params.{k}": v for k, v in params.items()})
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, int(params["vocab"]), (1, 8), generator=gen)
        generate(cm, prompt, max_new_tokens=16, temperature=0, use_cache=True)  # refuses a non-decoding node
        cm.module.eval()
        ids = torch.randint(0, int(params["vocab"]), (1, 8 + 900), generator=gen)
        # the prompt (8) plus n - 1 generated tokens: the next step produces token n
        a, b = Decoder(cm.module, ids[:, :8 + 99]), Decoder(cm.module, ids[:, :8 + 899])
        times_a, times_b = [], []
        for _ in range(100):
            times_a.append(a.step())
            times_b.append(b.step())
        early, late = statistics.median(times_a), statistics.median(times_b)
        table.add_row(name, f"{cm.num_params:,}", f"{early * 1e3:.2f}", f"{late * 1e3:.2f}", f"{late / early:.2f}x")
        con.print(f"{name}: {early * 1e3:.2f} -> {late * 1e3:.2f} ms/token ({late / early:.2f}x)")
    con.print(table)


if __name__ == "__main__":
    main()
