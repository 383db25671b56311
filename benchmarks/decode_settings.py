"""The decode engine's step under different compile settings and attention paths, side by side.

    python benchmarks/decode_settings.py                 # GPT-2 124M and the LLaMA-2 7B layout (one GPU)
    python benchmarks/decode_settings.py --model gpt2    # only GPT-2
    python benchmarks/decode_settings.py --smoke         # tiny sizes on CPU (checks the script)

Each setting builds a ``DecodeEngine`` on the same weights (bf16, batch 1, random weights, a
32-token prompt, 256 greedy tokens) with ``attention`` = ``sdpa`` or ``math`` (the written-out
attention of ``components/_static_cache.ATTENTION``) and inductor ``options`` for the compiled
step (``cdt``: coordinate-descent tuning of the generated kernels; ``autotune``: max-autotune,
which also times Triton templates against cuBLAS for every matmul). Per setting: tokens/s (the
median of ``--rounds`` whole calls, prefill included), the share of the weights-read bound, the
prefill's own time (a call for one token), and from one profiled run the kernels per token and the
GPU's busy time per token against the wall time per token (busy well below wall: the host
feeds the GPU too slowly; busy near wall: the kernels themselves take the time). Greedy tokens of
every setting are compared with the first setting's (bf16 rounding may part them late).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import card, profile_engine, say, timed  # noqa: E402

from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph.runtime.decode_engine import DecodeEngine  # noqa: E402

OPTIONS = {
    "default": None,
    "cdt": {"coordinate_descent_tuning": True},
    "autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}
SETTINGS = {  # name -> (attention, inductor options)
    "gpt2": [("sdpa", "default"), ("math", "default"), ("sdpa", "cdt"), ("math", "cdt"), ("math", "autotune")],
    "llama2-7b": [("sdpa", "default"), ("math", "cdt"), ("sdpa", "cdt")],
}
MODELS = {"gpt2": "blueprints/families/gpt2.yaml", "llama2-7b": "blueprints/llama2-7b.yaml"}
SMOKE = {"params.layers": 2, "params.dim": 64, "params.heads": 4, "params.hidden": 128, "params.vocab": 256,
         "params.context": 64}


def run(args, model: str, device: torch.device, dtype: torch.dtype, bw: float | None) -> list[dict]:
    over = dict(SMOKE) if args.smoke else {}
    if args.smoke and model == "llama2-7b":
        over["params.kv_heads"] = 2
    cm = compile_blueprint(ROOT / MODELS[model], overrides=over, device=str(device), seed=0)
    cm.module.to(dtype).eval()
    nbytes = sum(p.numel() * p.element_size() for p in cm.module.parameters())
    vocab = cm.resolved.params["vocab"]
    prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    n, rows, first = args.new_tokens, [], None
    for attention, opts in SETTINGS[model]:
        label = f"{model} {attention} {opts}"
        torch._dynamo.reset()
        t = time.perf_counter()
        engine = DecodeEngine(cm, batch=1, max_len=args.prompt + n, compile=True, attention=attention,
                              compile_options=OPTIONS[opts])
        go = lambda: engine.generate([prompt], max_new_tokens=n)  # noqa: E731
        out = go()
        go()
        say(f"{label}: warm-up {time.perf_counter() - t:.1f}s")
        first = out if first is None else first
        same = next((i for i, (a, b) in enumerate(zip(out[0], first[0])) if a != b), len(out[0])) - args.prompt
        tps = statistics.median(n / timed(go, device) for _ in range(args.rounds))
        prefill = statistics.median(timed(lambda: engine.generate([prompt], max_new_tokens=1), device)
                                    for _ in range(args.rounds))
        prof = profile_engine(go, n, device, top=6)
        rows.append(dict(label=label, tps=tps, bound=bw / nbytes if bw else None, prefill_ms=prefill * 1e3,
                         same=same, **prof))
        say(f"  {tps:,.0f} tok/s; prefill {prefill * 1e3:.1f} ms; tokens equal to the first setting's: {same} of {n}")
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", *MODELS], default="all")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.prompt, args.new_tokens, args.rounds = 8, 16, 1
        for k in SETTINGS:
            SETTINGS[k] = [("sdpa", "default"), ("math", "default")]
    name, bw = card(device, None)
    say(f"device: {name}, torch {torch.__version__}, {dtype}")
    rows = []
    for model in MODELS if args.model == "all" else [args.model]:
        rows += run(args, model, device, dtype, bw)
    print(f"\nDecode engine settings, batch 1, {args.prompt}-token prompt, {args.new_tokens} greedy tokens, {dtype}; "
          f"{name}; the bound = weight bytes / {bw / 1e12:.2f} TB/s" if bw else f"\nDecode engine settings on {name}")
    print("| model attention options | tokens/s | of bound | us/token (wall) | GPU busy us/token | kernels/token "
          "| prefill ms | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = f"{100 * r['tps'] / r['bound']:.1f}%" if r["bound"] else "-"
        print(f"| {r['label']} | {r['tps']:,.0f} | {share} | {1e6 / r['tps']:.0f} | "
              f"{1e3 * r['busy_ms'] / args.new_tokens:.0f} | {r['kernels']:.1f} | {r['prefill_ms']:.1f} | {r['same']} |")


if __name__ == "__main__":
    main()
