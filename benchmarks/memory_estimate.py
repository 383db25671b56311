"""``build --memory`` against the measured peak of real training steps, side by side.

    python benchmarks/memory_estimate.py            # one GPU: the rows below
    python benchmarks/memory_estimate.py --smoke    # CPU: tiny models, the peak counted by LiveBytes
    python benchmarks/memory_estimate.py --estimate-only   # CPU: the GPU rows' estimates, nothing run

Each row compiles a blueprint on meta for the estimate (``physlm_graph._memory``, what
``build --memory`` prints) and on the GPU for the measurement: three optimizer steps of fused
AdamW on fp32 weights under bf16 autocast, the loss the trainer's ``Objective`` computes
(unfused cross-entropy on fp32 logits), gradients set to None between steps. The peak is
``torch.cuda.max_memory_allocated`` over the third step (optimizer state allocated by then);
on CPU, which keeps no peak, the same step counted by ``physlm_graph._livebytes.measure_step``
(every storage an operation creates, while it lives; kernels' internal buffers are not seen).
Eager mode, as the estimate assumes. The ratio is estimate / measured (goal: within 10%).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from rich.console import Console
from rich.table import Table

from physlm_graph import compile_blueprint
from physlm_graph._livebytes import measure_step
from physlm_graph._memory import estimate_memory
from physlm_graph._passes import checkpoint_blocks
from physlm_graph.runtime.objective import Objective

ROWS = [  # (label, blueprint, overrides, batch, seq)
    ("gpt2-124m b8", "blueprints/gpt2-124m.yaml", [], 8, 1024),
    ("gpt2-124m b16", "blueprints/gpt2-124m.yaml", [], 16, 1024),
    ("gpt2-124m b16, checkpointing blocks", "blueprints/gpt2-124m.yaml", ["train.checkpointing=blocks"], 16, 1024),
    ("llama2-7b layout, 4 layers, b2", "blueprints/llama2-7b.yaml", ["layers=4"], 2, 2048),
]
TINY_LLAMA = ["vocab=4096", "dim=64", "heads=4", "kv_heads=2", "layers=2", "hidden=128", "context=128"]  # logits dominate
SMOKE = [("baby-gpt-cpu b4", "blueprints/baby-gpt-cpu.yaml", [], 4, 64),
         ("baby-gpt-cpu b4, checkpointing every 2", "blueprints/baby-gpt-cpu.yaml", ["train.checkpointing={every: 2}"], 4, 64),
         ("tiny llama, vocab 4096 b2", "blueprints/llama-style.yaml", TINY_LLAMA, 2, 64),
         ("tiny llama, vocab 4096 b2, checkpointing blocks", "blueprints/llama-style.yaml",
          [*TINY_LLAMA, "train.checkpointing=blocks"], 2, 64)]


def measure(blueprint: str, overrides: list[str], batch: int, seq: int, device: torch.device) -> int:
    cm = compile_blueprint(blueprint, overrides=overrides, device=device)
    checkpoint_blocks(cm.module, cm.resolved, cm.train_config.checkpointing)  # as the trainer does
    model = cm.module.train()
    if device.type == "cpu":  # no allocator peak: count the storages (bf16 autocast runs on CPU too)
        x = torch.randint(0, 64, (batch, seq))
        return measure_step(model, {next(iter(cm.resolved.inputs)): x}, torch.randint(0, 64, (batch, seq)))["peak"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    objective = Objective(cm.loss_weights)
    for name, shape in cm.resolved.inputs.items():
        assert tuple(shape) == ("batch", "seq"), f"input {name} shaped {shape}"
    x = torch.randint(0, 64, (batch, seq), device=device)
    y = torch.randint(0, 64, (batch, seq), device=device)
    peak = 0
    for step in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**{next(iter(cm.resolved.inputs)): x})
            loss, _ = objective(cm, out, y)
        del out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device)
    del model, opt, cm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: the peak counted by LiveBytes")
    ap.add_argument("--estimate-only", action="store_true", help="the rows' estimates only (CPU, meta), nothing run")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    rows = SMOKE if args.smoke else ROWS
    con = Console()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    what = "the estimate alone" if args.estimate_only else f"the estimate against the measured peak ({name})"
    t = Table(title=f"build --memory: {what}, torch {torch.__version__}, bf16 autocast, eager, fused AdamW",
              title_justify="left")
    cols = ["run", "params", "activations/token", "static", "forward", "backward", "step", "estimate"]
    for col in cols + ([] if args.estimate_only else ["measured peak", "estimate / measured"]):
        t.add_column(col, justify="left" if col == "run" else "right")
    for label, bp, sets, batch, seq in rows:
        t0 = time.time()
        meta = compile_blueprint(bp, overrides=sets, device="meta")
        est = estimate_memory(meta, batch=batch, seq=seq, checkpointing=meta.train_config.checkpointing)
        parts = [label, f"{est.params:,}", f"{est.activations_per_token / 1024:.1f} KiB",
                 *(_gib(getattr(est, k)) for k in ("static", "forward", "backward", "step")),
                 f"{_gib(est.single)} ({est.peak_phase})"]
        if args.estimate_only:
            t.add_row(*parts)
            continue
        try:
            peak = measure(bp, sets, batch, seq, device)
        except torch.OutOfMemoryError as e:
            con.print(f"{label}: out of memory ({e})")
            continue
        t.add_row(*parts, _gib(peak), f"{est.single / peak:.3f}")
        con.print(f"  {label}: {time.time() - t0:.0f} s")
    con.print(t)


if __name__ == "__main__":
    main()
