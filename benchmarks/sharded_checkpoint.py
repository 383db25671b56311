"""Saving and loading an FSDP2 run's checkpoint: full (gathered to rank 0) against sharded (each
rank writes its own pieces through torch.distributed.checkpoint), the same model and AdamW state.

    torchrun --nproc-per-node 2 benchmarks/sharded_checkpoint.py [--blueprint blueprints/gpt2-124m.yaml] [--repeat 3]
    torchrun --nproc-per-node 2 benchmarks/sharded_checkpoint.py --smoke      # tiny, on CPU over gloo

Each format is saved ``--repeat`` times into a temporary folder (``--dir`` to choose the disk) and
loaded back into the sharded model (weights and optimizer); the table gives the median seconds,
the bytes written, the most memory rank 0 allocated on the GPU during the save (on CUDA), and the
ratio full / sharded. Run it where the checkpoints of real runs go: the filesystem decides much.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blueprint", default="blueprints/gpt2-124m.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="blueprint overrides (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where to write (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    args = ap.parse_args()

    from physlm_graph._compile import compile_blueprint
    from physlm_graph.runtime.cadence import save_run
    from physlm_graph.runtime.checkpoint import model_vocab
    from physlm_graph.runtime.distributed import close_distributed, init_distributed, wrap_model
    from physlm_graph.runtime.optim import make_optimizer

    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    blueprint = str(ROOT / ("blueprints/baby-gpt-cpu.yaml" if args.smoke else args.blueprint))
    sets = ["dim=32", "heads=2", "layers=2"] if args.smoke else args.sets
    cm = compile_blueprint(blueprint, overrides=sets, device="cpu")
    model = cm.module.to(device)
    blocks = [p for paths in cm.resolved.instances.values() for p in paths]
    wrap_model(model, info, "fsdp", blocks)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    ids = torch.randint(0, model_vocab(cm), (2, 64), device=device)
    model(ids)["logits"].float().square().mean().backward()
    opt.step()  # the AdamW moments exist

    root = Path(args.dir or tempfile.gettempdir()) / f"ckpt-bench-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    rows = []
    for fmt in ("full", "sharded"):
        t = SimpleNamespace(out_dir=root, dist=info, strategy="fsdp", model=model, optimizer=opt, cm=cm, tokenizer=None,
                            cfg=SimpleNamespace(checkpoint_format=fmt, steps=1, schedule="constant"),
                            trainer_state=lambda: {"step": 1}, batches=SimpleNamespace(state_dict=lambda: {}), notes=[])
        saves, loads, peak = [], [], 0
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            folder = save_run(t, fmt)
            saves.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated(device))
            t0 = time.perf_counter()
            _load(t, folder)
            loads.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in (root / fmt).rglob("*") if p.is_file())
        rows.append((fmt, statistics.median(saves), statistics.median(loads), size, peak))
    if info.main:
        where = f"{info.world} processes, {device.type}" + (f" ({torch.cuda.get_device_name(device)})"
                                                           if device.type == "cuda" else "")
        print(f"checkpoint of {cm.name} ({cm.num_params:,} params + AdamW), FSDP2 on {where}, median of {args.repeat}")
        print(f"{'format':<8} {'save s':>8} {'load s':>8} {'MiB written':>12} {'GPU peak MiB':>13}")
        for fmt, s, ld, size, peak in rows:
            print(f"{fmt:<8} {s:8.3f} {ld:8.3f} {size / 2**20:12.1f} {peak / 2**20:13.1f}")
        (_, fs, fl, _, fp), (_, ss, sl, _, sp) = rows
        print(f"{'full/sharded':<8} {fs / ss:7.2f}x {fl / sl:7.2f}x {'':>12} {(fp / sp if sp else float('nan')):12.2f}x")
        shutil.rmtree(root, ignore_errors=True)
    close_distributed()


def _load(t: SimpleNamespace, folder: Path) -> None:
    """Weights and optimizer back into the sharded model, as ``--resume`` loads them."""
    from physlm_graph.runtime.checkpoint import load_weights, restore_optimizer
    from physlm_graph.runtime.sharded_checkpoint import is_sharded, load_sharded

    if is_sharded(folder):
        load_sharded(folder, t.model, t.optimizer, cm_hash=t.cm.hash)
    else:
        load_weights(t.model, folder)
        restore_optimizer(t.optimizer, folder)


if __name__ == "__main__":
    main()
