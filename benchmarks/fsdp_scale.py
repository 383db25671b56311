"""FSDP2 training of a large blueprint on several GPUs: tokens/s, MFU and the peak memory against
``build --memory``'s estimate, in one run (issue 29's 7B row).

    python benchmarks/fsdp_scale.py --gpus 8                         # llama2-7b, seq 2048, batch 2 per GPU
    python benchmarks/fsdp_scale.py --gpus 8 --batch 4 --checkpointing blocks
    python benchmarks/fsdp_scale.py --smoke                          # CPU: 2 gloo processes, a tiny llama

Each configuration runs ``physlm-graph train BLUEPRINT --gpus N --strategy fsdp`` (bf16 autocast,
FSDP2 with bf16 all-gathers, torch.compile, sharded checkpoints) for ``--steps`` steps on random
token ids written as a token shard (seed 0; nothing is downloaded), and reads the run's
``metrics.jsonl``: tokens/s is the median of the steps after ``--skip`` (compilation and
warm-up), over all ranks; the peak is the main rank's ``peak_memory_bytes``. MFU counts
``6 N + 12 L D T`` FLOPs per token (N the parameters without the token table; the attention's
matmuls at window T) against the GPU's dense bf16 peak (H100/H200 SXM 989 TFLOP/s; ``--peak``
to set it). The estimate is ``build --memory --world N --batch B --seq T`` with the run's
checkpointing, its ``fsdp`` figure per device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PEAK = {"H100": 989e12, "H200": 989e12}
SMOKE = ["params.layers=2", "params.dim=64", "params.heads=4", "params.kv_heads=4", "params.hidden=128",
         "params.vocab=512", "params.context=64"]


def gpu_peak(override: float | None) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "CPU", override
    name = torch.cuda.get_device_name()
    return name, override or next((v for k, v in PEAK.items() if k in name), None)


def flops_per_token(blueprint: str, overrides: list[str], seq: int) -> tuple[float, int]:
    """(6 N + 12 L D T, N): N without the token table (its lookup is no matmul)."""
    import yaml

    from physlm_graph import compile_blueprint

    sets = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}  # as --set reads them
    cm = compile_blueprint(ROOT / blueprint, overrides=sets, device="meta")
    p = cm.resolved.params
    n = sum(t.numel() for name, t in cm.module.named_parameters() if not name.startswith("tok."))
    return 6 * n + 12 * int(p["layers"]) * int(p["dim"]) * seq, n


def estimate(blueprint: str, overrides: list[str], world: int, batch: int, seq: int, checkpointing: str) -> int:
    cmd = [sys.executable, "-m", "physlm_graph", "build", str(ROOT / blueprint), "--memory", "--json",
           "--world", str(world), "--batch", str(batch), "--seq", str(seq),
           *[a for o in overrides + [f"train.checkpointing={checkpointing}"] for a in ("--set", o)]]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        sys.exit(f"fsdp_scale.py: build --memory failed:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout)["memory"]["fsdp"])


def run(args: argparse.Namespace, shard: Path, tok: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(ROOT / args.blueprint), "--data", str(shard),
           "--tokenizer", str(tok), "--steps", str(args.steps), "--gpus", str(args.gpus), "--strategy", "fsdp",
           "--out", str(out), "--no-progress",
           *[a for o in args.set + [f"train.seq_len={args.seq}", f"train.batch_size={args.batch}",
                                    f"train.accumulate={args.accumulate}", f"train.checkpointing={args.checkpointing}",
                                    "train.checkpoint_format=sharded", "train.log_every=1",
                                    f"train.eval_every={10 * args.steps}", "train.eval_iters=1",
                                    f"train.save_every={10 * args.steps}", "train.warmup=0"]
             for a in ("--set", o)]]
    if args.smoke:
        cmd += ["--device", "cpu"]
    else:
        cmd += ["--set", "train.compile=true", "--set", "train.dtype=bfloat16"]
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True)
    if res.returncode:
        print(res.stdout[-3000:], res.stderr[-5000:], sep="\n")
        return {"error": f"exit {res.returncode}"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows if r["step"] > args.skip] or [rows[-1]["tokens_per_s"]]
    return {"tps": statistics.median(timed), "peak": max((r.get("peak_memory_bytes", 0) for r in rows), default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blueprint", default="blueprints/llama2-7b.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2, help="micro-batch rows per GPU")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--checkpointing", default="none", help="train.checkpointing: none, blocks, \"{every: K}\" or \"{nodes: [PATTERNS]}\"")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="steps left out of the median (compilation)")
    ap.add_argument("--peak", type=float, default=None, help="dense bf16 FLOP/s of one GPU (default: by name)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more blueprint overrides")
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 gloo processes, a tiny llama (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        args.gpus, args.seq, args.batch, args.steps, args.skip = 2, 32, 2, 4, 1
        args.set = SMOKE + args.set
    name, peak = gpu_peak(args.peak)
    fpt, n = flops_per_token(args.blueprint, args.set, args.seq)
    est = estimate(args.blueprint, args.set, args.gpus, args.batch, args.seq, args.checkpointing)
    from speedrun_speed import make_data

    vocab = int(next((o.split("=")[1] for o in args.set if o.startswith("params.vocab=")), 32000))
    with tempfile.TemporaryDirectory() as tmp:
        shard, tok = make_data(Path(tmp), vocab=vocab, tokens=max(4 * args.gpus * args.batch * args.accumulate
                                                                    * (args.seq + 1) * args.steps, 100_000))
        got = run(args, shard, tok, Path(tmp) / "run")
    print(f"\nFSDP2, {args.blueprint} ({n / 1e9:.2f}B parameters without the table), {args.gpus} x {name}; "
          f"seq {args.seq}, batch {args.batch} per GPU x accumulate {args.accumulate}, checkpointing "
          f"{args.checkpointing}; {args.steps} steps, median after {args.skip}\n")
    print("| tokens/s (all GPUs) | tokens/s per GPU | MFU | peak memory (main rank) | build --memory (fsdp) | estimate / peak |")
    print("|---:|---:|---:|---:|---:|---:|")
    if "error" in got:
        print(f"| {got['error']} | | | | {est / 2**30:.1f} GiB | |")
        sys.exit(1)
    per = got["tps"] / args.gpus
    mfu = f"{100 * per * fpt / peak:.1f}%" if peak else "-"
    pk = got["peak"]
    print(f"| {got['tps']:,.0f} | {per:,.0f} | {mfu} | {pk / 2**30:.1f} GiB | {est / 2**30:.1f} GiB | "
          f"{(f'{est / pk:.3f}' if pk else '-')} |")


if __name__ == "__main__":
    main()
