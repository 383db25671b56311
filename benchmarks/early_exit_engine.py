"""Early exit and self-speculative decoding against the fast full-depth decode engine, in one run.

    python benchmarks/early_exit_engine.py --smoke        # CPU: tiny model, short training, few tokens
    python benchmarks/early_exit_engine.py                # GPU: trains the 6-layer baby GPT with exits
    python benchmarks/early_exit_engine.py --ckpt runs/baby-gpt-exits --speculate 1:3,2:4 --thresholds 0.9

``benchmarks/early_exit.py`` measured self-speculative decoding at 2.05x against ``generate()``
with the append cache; this script asks the same question against the decode engine
(``runtime/decode_engine.py``: static caches, the one-token step compiled and captured as a CUDA
graph on a GPU), which is the fast full-depth path. Rows, all batch 1, greedy, one table:

- ``full depth, engine``: ``DecodeEngine`` (the baseline, 1.00x);
- ``full depth, generate()``: the append cache, step by step;
- ``self-speculative, engine`` per ``EXIT:K``: ``speculative_engine.SpeculativeEngine`` (the
  draft + verify round compiled and captured as one CUDA graph on a GPU);
- ``self-speculative, old`` per ``EXIT:K``: ``speculative.generate_self_speculative``;
- ``early exit, engine`` per threshold: ``exit_engine.generate_with_exits_static`` (lazy KV
  fill; exits decided on the host each token, so not captured);
- ``early exit, old`` per threshold: ``early_exit.generate_with_exits``.

Columns: tokens/s (median of ``--rounds`` rounds taken in turn, every mode once per round, after
a warm-up that compiles and captures), the ratio to the full-depth engine and to ``generate()``,
``same`` (share of generated tokens equal to full depth's greedy ones: 100% for the exact modes),
and for speculation the share of drafts accepted and tokens per verification, for early exit the
mean layers a prediction used. Without ``--ckpt`` the model is trained first, as
``benchmarks/early_exit.py`` does (same blueprint and defaults); every sequence stays within the
context (less the largest K, so that no speculative round has to draft fewer tokens near the
end of the buffers), so nothing re-prefills during timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from early_exit import DATA, load_model, train_model  # noqa: E402

from physlm_graph.runtime.checkpoint import model_context  # noqa: E402
from physlm_graph.runtime.decode_engine import DecodeEngine  # noqa: E402
from physlm_graph.runtime.early_exit import exit_points, generate_with_exits  # noqa: E402
from physlm_graph.runtime.exit_engine import generate_with_exits_static  # noqa: E402
from physlm_graph.runtime.generate import generate  # noqa: E402
from physlm_graph.runtime.speculative import generate_self_speculative  # noqa: E402
from physlm_graph.runtime.speculative_engine import SpeculativeEngine  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


class Mode:
    """One decoding mode: ``run(prompt, n) -> (ids, stats or None)``, its timings and outputs."""

    def __init__(self, name: str, setting: str, run) -> None:
        self.name, self.setting, self.run = name, setting, run
        self.tps: list[float] = []
        self.ids: list[list[int]] = []
        self.stats: list = []
        self.error: str | None = None


def time_modes(modes: list[Mode], prompts: list[list[int]], n: int, rounds: int, device: torch.device) -> None:
    """Warm each mode up (compiles, captures), then ``rounds`` rounds, each mode once per round
    over all prompts, so drift hits every mode alike."""
    for m in modes:
        t = time.perf_counter()
        try:
            m.run(prompts[0], n)  # compiles and captures where it does
        except Exception as err:  # a failed mode is reported in the table; the others carry on
            m.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            say(f"  {m.name} {m.setting}: FAILED {m.error}")
            continue
        say(f"  {m.name} {m.setting}: warm-up {time.perf_counter() - t:.1f}s")
    live = [m for m in modes if m.error is None]
    for r in range(rounds):
        for m in live:
            ids, stats = [], []
            sync(device)
            t = time.perf_counter()
            for p in prompts:
                out, st = m.run(p, n)
                ids.append(out)
                stats.append(st)
            sync(device)
            m.tps.append(len(prompts) * n / (time.perf_counter() - t))
            m.ids, m.stats = ids, stats
        say(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m.name} {m.setting} {m.tps[-1]:,.0f}" for m in live))


def build_modes(cm, args, context: int, device: torch.device) -> list[Mode]:
    compile = device.type == "cuda" and not args.no_compile
    engine = DecodeEngine(cm, batch=1, max_len=context, compile=compile)
    modes = [Mode("full depth, engine", "", lambda p, n: (engine.generate([p], max_new_tokens=n)[0], None)),
             Mode("full depth, generate()", "",
                  lambda p, n: (generate(cm, p, max_new_tokens=n, temperature=0, use_cache=True), None))]
    points = exit_points(cm)
    for pair in [p.strip() for p in args.speculate.split(",") if p.strip()]:
        e, k = (int(v) for v in pair.split(":"))
        if e >= len(points):
            say(f"  skipping speculation {pair}: the model has {len(points)} exits")
            continue
        setting = f"{points[e]}/k{k}"
        spec = SpeculativeEngine(cm, batch=1, max_len=context, draft_exit=e, draft_len=k, compile=compile)

        def on_engine(p, n, spec=spec):
            return spec.generate([p], max_new_tokens=n)[0], spec.stats

        def old(p, n, e=e, k=k):
            return generate_self_speculative(cm, p, max_new_tokens=n, draft_exit=e, draft_len=k)

        modes += [Mode("self-speculative, engine", setting, on_engine), Mode("self-speculative, old", setting, old)]
    for thr in [float(v) for v in args.thresholds.split(",") if v.strip()]:
        kw = dict(rule=args.rule, threshold=thr, kv_fill="lazy")

        def static(p, n, kw=kw):
            return generate_with_exits_static(cm, p, max_new_tokens=n, **kw)

        def old_exits(p, n, kw=kw):
            return generate_with_exits(cm, p, max_new_tokens=n, **kw)

        setting = f"{args.rule} {thr:g}"
        modes += [Mode("early exit, engine", setting, static), Mode("early exit, old", setting, old_exits)]
    return modes


def detail(m: Mode) -> str:
    st = [s for s in m.stats if s is not None]
    if not st:
        return ""
    if hasattr(st[0], "drafted"):
        drafted, accepted = sum(s.drafted for s in st), sum(s.accepted for s in st)
        per = sum(sum(s.per_round) for s in st) / max(sum(len(s.per_round) for s in st), 1)
        return f"{100 * accepted / max(drafted, 1):.0f}% of drafts accepted, {per:.2f} tokens per verification"
    counts = np.sum([s.counts for s in st], axis=0)
    layers = float((counts * np.array(st[0].depths)).sum() / max(counts.sum(), 1))
    return f"{layers:.2f} of {st[0].depths[-1]} layers per prediction"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a checkpoint (or run folder) of a model with exits; default: train one")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: 6 layers x 128 wide, context 64, 60 training steps, 2 prompts")
    ap.add_argument("--data", default=str(DATA), help="tiny Shakespeare input.txt (training and prompts)")
    ap.add_argument("--steps", type=int, help="training steps (default 3000; --smoke: 60)")
    ap.add_argument("--every", type=int, default=1, help="an exit after every k layers (training a model)")
    ap.add_argument("--rule", default="margin", choices=["top1", "margin", "entropy", "saturation"])
    ap.add_argument("--thresholds", default="0.9,0.6", help="early-exit thresholds (comma-separated; empty: none)")
    ap.add_argument("--speculate", default="1:3,2:4,2:6",
                    help="self-speculative runs as EXIT:K pairs (exit index, shallowest first: 0; K drafted "
                         "tokens per round), comma-separated; empty for none")
    ap.add_argument("--prompts", type=int, help="prompts from the validation text (default 8; --smoke: 2)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--rounds", type=int, help="timed rounds per mode (default 3; --smoke: 1)")
    ap.add_argument("--no-compile", action="store_true",
                    help="on a GPU: capture the engines' steps without torch.compile")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="run folder for the trained model (default: a temporary folder)")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.small = args.smoke  # what early_exit.train_model reads
    args.steps = args.steps or (60 if args.smoke else 3000)
    n_prompts = args.prompts or (2 if args.smoke else 8)
    rounds = args.rounds or (1 if args.smoke else 3)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    say(f"device: {describe(device)}")

    cm, _, val = load_model(args, device) if args.ckpt else train_model(args, device)
    val = np.asarray(val, dtype=np.int64)
    cm.module.to(device).eval()
    context = model_context(cm)
    ks = [int(p.split(":")[1]) for p in args.speculate.split(",") if p.strip()]
    n = context - args.prompt_len - max(ks, default=0)  # within the context, and every round drafts a whole k
    step = max(1, (len(val) - args.prompt_len) // n_prompts)
    prompts = [val[i * step : i * step + args.prompt_len].tolist() for i in range(n_prompts)]
    modes = build_modes(cm, args, context, device)
    say(f"timing {len(modes)} modes: {n_prompts} prompts x {n} greedy tokens, {rounds} round(s)")
    with torch.inference_mode():
        time_modes(modes, prompts, n, rounds, device)

    base = modes[0]
    plain = modes[1]
    if base.error is not None:
        print(f"the full-depth engine failed ({base.error}): no ratios")
        return 1
    ref_ids = base.ids
    eng_tps = statistics.median(base.tps)
    old_tps = statistics.median(plain.tps) if plain.tps else None
    print()
    how = ("eager" if device.type != "cuda" else "CUDA graphs" if args.no_compile else "compiled + CUDA graphs")
    print(f"Early exit and self-speculative decoding against the full-depth engine; {describe(device)}; "
          f"{cm.name}, {len(exit_points(cm))} exits; {n_prompts} prompts x {n} greedy tokens, batch 1; "
          f"{'CPU smoke run, ' if args.smoke else ''}engines {how}")
    head = (f"| {'mode':<26} | {'setting':<14} | {'tok/s':>9} | {'vs engine':>9} | {'vs generate()':>13} | "
            f"{'same':>5} | detail")
    print(head)
    print("|" + "|".join("-" * (w + 2) for w in (26, 14, 9, 9, 13, 5)) + "|-------")
    for m in modes:
        if m.error is not None:
            print(f"| {m.name:<26} | {m.setting:<14} | {'failed':>9} | {'-':>9} | {'-':>13} | {'-':>5} | {m.error}")
            continue
        tps = statistics.median(m.tps)
        same = np.mean([np.mean(np.array(a[args.prompt_len:]) == np.array(b[args.prompt_len:]))
                        for a, b in zip(m.ids, ref_ids)])
        vs_old = f"{tps / old_tps:.2f}x" if old_tps else "-"
        print(f"| {m.name:<26} | {m.setting:<14} | {tps:>9,.1f} | {tps / eng_tps:>8.2f}x | {vs_old:>13} | "
              f"{100 * same:>4.0f}% | {detail(m)}")
    spec = [m for m in modes if m.name == "self-speculative, engine" and m.tps]
    if spec:
        best = max(spec, key=lambda m: statistics.median(m.tps))
        ratio = statistics.median(best.tps) / eng_tps
        print(f"best self-speculative on the engine: {best.setting}, {ratio:.2f}x the full-depth engine "
              f"({'faster' if ratio > 1 else 'not faster'})")
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
