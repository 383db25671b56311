"""Where the trainer's step time goes on one GPU: ``Trainer.train_step`` as ``physlm-graph train
--compile`` runs it, timed and profiled, beside the compiled model's own forward + backward +
AdamW without the trainer around it (what ``gpt2_speed.py`` times).

    python benchmarks/trainer_profile.py --data input.txt --tokenizer gpt2 [--blueprint blueprints/gpt2-124m.yaml]
        [--steps 20] [--set train.grad_clip=0 ...]

Prints the median step time of each, the GPU kernel time per step by group (the difference is
time the GPU waits for the host), and the kernels the trainer runs that the bare step does not.

Under torchrun it profiles the DDP step (rank 0 reports; the bare step then includes DDP's
all-reduces too): ``torchrun --nproc-per-node 2 benchmarks/trainer_profile.py ...``. The NCCL
kernels run on their own stream beside the compute, so "compute kernels ms" leaves them out and
"not computing ms" (step minus compute kernels) is the time the compute stream spends waiting:
on the host, or on an all-reduce that nothing overlaps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import kernel_groups, kernel_times, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from physlm_graph import PhysLMError  # noqa: E402
from physlm_graph.runtime.train import Trainer  # noqa: E402

GROUPS = (("all-reduce (NCCL)", ("nccl",)), ("attention", ("flash", "fmha", "sdpa", "cudnn")),
          ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "splitkreduce")),
          ("optimizer", ("adam",)), ("foreach (clip, norms)", ("multi_tensor", "foreach")),
          ("loss", ("_ce_rows",)), ("inductor Triton", ("triton_",)))


def timed(fn, rounds: int, per: int) -> float:
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / per)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blueprint", default=str(ROOT / "blueprints" / "gpt2-124m.yaml"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of 10 steps for each")
    ap.add_argument("--profile", type=int, default=3, help="profiled steps of each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="blueprint overrides")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trainer_profile.py: needs a CUDA GPU (none found)")
    for flag, path in (("--blueprint", args.blueprint), ("--data", args.data)):
        if not Path(path).exists():
            sys.exit(f"trainer_profile.py: {flag}: no file or folder at {path}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(args.blueprint, out_dir=tmp, data=args.data, tokenizer=args.tokenizer, compile=True,
                    progress=False, overrides=args.set, steps=10**6)
        try:
            t.setup()
        except PhysLMError as err:  # a broken blueprint, override, tokenizer or text: said where, no traceback
            sys.exit(f"trainer_profile.py: {err}")
        step = [0]
        pending: list = []

        def trainer_step():  # as fit() runs it: resolve (the host sync) at every 10th step
            pending.append(t.train_step(step[0]))
            step[0] += 1
            if step[0] % 10 == 0:
                t.resolve(pending[-1])

        x, y = next(t.batches)

        def bare_step():  # the compiled forward + loss, backward and AdamW, nothing else
            t.optimizer.zero_grad(set_to_none=True)
            with t.autocast():
                loss, _ = t.forward_loss(x, y)
            loss.backward()
            t.optimizer.step()

        for fn in (trainer_step, bare_step):
            for _ in range(12):
                fn()
        torch.cuda.synchronize()
        times = {"trainer": timed(trainer_step, args.rounds, 10), "bare": timed(bare_step, args.rounds, 10)}
        kernels = {"trainer": kernel_times(trainer_step, args.profile), "bare": kernel_times(bare_step, args.profile)}
    if not t.dist.main:
        return
    tokens = t.tokens_per_step
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {Path(args.blueprint).name}, "
          f"{tokens:,} tokens/step, compile mode {t.cfg.compile}, grad clip {t.cfg.grad_clip:g}, "
          f"deferred steps {t.deferred()}, {t.dist.world} process(es)\n")
    rows = []
    for name in ("trainer", "bare"):
        step_ms = times[name] * 1e3
        by = kernel_groups(kernels[name], GROUPS)
        compute = sum(ms for g, ms in by.items() if g != GROUPS[0][0])
        rows.append([name, f"{step_ms:.2f}", f"{tokens / times[name]:,.0f}", f"{compute:.2f}",
                     f"{step_ms - compute:.2f}"] + [f"{by.get(g, 0.0):.2f}" for g, _ in GROUPS] + [f"{by.get('other', 0):.2f}"])
    print(table(["step", "ms/step", "tokens/s", "compute kernels ms", "not computing ms"] + [g for g, _ in GROUPS]
                + ["other"], rows))
    print(f"\ntrainer / bare tokens/s: {times['bare'] / times['trainer']:.3f}")
    bare = {key: (ms, n) for ms, n, key in kernels["bare"]}
    extra = []
    for ms, n, key in kernels["trainer"]:
        b_ms, b_n = bare.get(key, (0.0, 0))
        if ms - b_ms > 0.01 or n != b_n:
            extra.append([f"{ms - b_ms:+.3f}", f"{n} vs {b_n}", key[:90]])
    print("\nkernels the trainer runs more of (ms/step difference, launches per step trainer vs bare):")
    print(table(["ms", "launches", "kernel"], extra[:25], "rrl"))


if __name__ == "__main__":
    main()
