"""Decode speed at batch 1: the decode engine vs transformers' static cache + compile vs generate().

    python benchmarks/decode.py                      # GPT-2 124M, then the LLaMA-2 7B row (one GPU)
    python benchmarks/decode.py --model gpt2         # only GPT-2
    python benchmarks/decode.py --smoke              # tiny sizes, runs on CPU (checks the script)

GPT-2 124M is ``blueprints/families/gpt2.yaml`` with random weights in bf16; the same weights go
into transformers' ``GPT2LMHeadModel`` through the gpt2 family's weight map (``_hf_families``),
which generates with ``cache_implementation="static"`` (transformers then compiles its forward,
mode reduce-overhead). The LLaMA row is ``blueprints/llama2-7b.yaml``, bf16, random weights.
Each run: a 32-token prompt, then 256 greedy tokens; tokens/s = new tokens / wall time of the
whole call (prefill included), the median of ``--rounds`` runs taken in turn (A, B, C, A, ...)
after warm-up runs that compile. The weights-read bound is parameter bytes / HBM bandwidth
(H100 SXM 3.35e12 B/s, H200 4.8e12; ``--bandwidth`` to set it): no batch-1 decoder can read its
weights once per token faster than that.
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

from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph.runtime.decode_engine import DecodeEngine  # noqa: E402
from physlm_graph.runtime.generate import generate  # noqa: E402

T0 = time.perf_counter()
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12}


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def card(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "CPU", override
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    return name, next((bw for key, bw in BANDWIDTH.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def hf_gpt2(cm, dtype: torch.dtype, device: torch.device):
    """transformers' GPT2LMHeadModel holding ``cm``'s weights (the gpt2 family's weight map)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from physlm_graph._hf_families import FAMILIES, config_from_params, weight_map

    fam = FAMILIES["gpt2"]
    config = config_from_params(fam, {k: cm.resolved.params[k] for k in fam.params})
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    ours = dict(cm.module.named_parameters())
    theirs = {}
    for m in weight_map(fam, cm, cm.module):
        value = ours[m.ours].detach()
        for name, part in zip(m.theirs, value.split(list(m.sizes), 0) if len(m.theirs) > 1 else [value]):
            theirs[name] = part.t() if m.transposed else part
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    assert not unexpected and all(k in ("lm_head.weight",) or "attn.bias" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model.to(device=device, dtype=dtype)


def profile_engine(fn, tokens: int, device: torch.device, top: int = 12) -> dict:
    """One more engine run under torch.profiler: kernels per generated token, the GPU time they
    take against the wall time, and the kernels that take most of it (printed, and returned as
    ``kernels`` per token, ``busy_ms`` and ``wall_ms`` of the run)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    if device.type == "cuda":  # kernels and copies, graph replays included
        gpu = [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"]
    else:  # on CPU: the outermost aten operations and their CPU time
        gpu = [(e.name, e.cpu_time_total) for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    busy = sum(us for _, us in gpu) / 1e3  # ms
    kind = "GPU operations" if device.type == "cuda" else "aten operations (CPU)"
    say(f"  profile: {len(gpu):,} {kind} for {tokens} tokens ({len(gpu) / tokens:.1f} per token); "
        f"GPU busy {busy:.1f} ms of {wall * 1e3:.1f} ms wall ({100 * busy / max(wall * 1e3, 1e-9):.0f}%)")
    by: dict[str, list[float]] = {}
    for name, us in gpu:
        by.setdefault(name, []).append(us)
    for k, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
        say(f"    {sum(v) / 1e3:8.2f} ms  {len(v) / tokens:5.1f}/token  {sum(v) / len(v):7.1f} us each  {k[:90]}")
    return dict(kernels=len(gpu) / tokens, busy_ms=busy, wall_ms=wall * 1e3)


def profile_host(fn, tokens: int, device: torch.device, top: int = 14) -> None:
    """``fn`` under cProfile, the device synchronised after: the host functions that take most of
    the wall time (cumulative and own time per generated token), and the GPU's busy share (CUDA)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    sync(device)
    t = time.perf_counter()
    prof.enable()
    fn()
    sync(device)
    prof.disable()
    wall = time.perf_counter() - t
    say(f"  host profile of generate(): {wall / tokens * 1e3:.2f} ms per token of wall time")
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    for (file, line, func), (_, calls, own, cum, _) in rows:
        say(f"    own {own / tokens * 1e3:7.3f} ms/token  cum {cum / tokens * 1e3:7.3f}  {calls / tokens:6.1f} calls/token  "
            f"{func} ({Path(file).name}:{line})")


def run_model(args, name: str, blueprint: Path, overrides: dict, device: torch.device, dtype: torch.dtype,
              with_hf: bool, old_tokens: int) -> list[tuple[str, float | None, str]]:
    say(f"{name}: building {blueprint.name} with random weights")
    cm = compile_blueprint(blueprint, overrides=overrides, device=str(device), seed=0)
    cm.module.to(dtype).eval()
    params = sum(p.numel() * p.element_size() for p in cm.module.parameters())  # tied weights once
    vocab = cm.resolved.params["vocab"]
    prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens
    engine = DecodeEngine(cm, batch=1, max_len=args.prompt + n, compile=not args.no_compile)
    runs = {"engine": lambda: engine.generate([prompt], max_new_tokens=n)}
    hf = None
    if with_hf:
        hf = hf_gpt2(cm, dtype, device)
        ids = torch.tensor([prompt], device=device)
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        if device.type == "cpu" and args.smoke:  # check the weight map: the same logits
            with torch.no_grad():
                torch.testing.assert_close(hf(ids).logits.float(), cm.module(ids)["logits"].float(), atol=2e-4, rtol=1e-3)
        runs["transformers static+compile"] = lambda: hf.generate(ids, **kw)
    say(f"{name}: warm-up (compiles and captures)")
    out = {}
    for key, fn in list(runs.items()):
        t = time.perf_counter()
        try:
            out[key] = fn()
            fn()
        except Exception as err:  # a failed candidate is reported in the table; the others carry on
            say(f"  {key}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            del runs[key]
            if key == "engine" and not args.no_compile:  # try the captured step without torch.compile
                engine = DecodeEngine(cm, batch=1, max_len=args.prompt + n, compile=False)
                key = "engine, eager step (compile failed)"
                runs[key] = lambda: engine.generate([prompt], max_new_tokens=n)
                out[key] = runs[key]()
            else:
                continue
        say(f"  {key}: warm-up {time.perf_counter() - t:.1f}s")
    rows = {k: [] for k in runs}
    mine = next(v for k, v in out.items() if k.startswith("engine"))[0][args.prompt:]
    if hf is not None and "transformers static+compile" in out:
        theirs = out["transformers static+compile"][0, args.prompt:].tolist()
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        say(f"  greedy tokens equal to transformers' for the first {same} of {n} (bf16 rounding may part them)")
    for r in range(args.rounds):
        for key, fn in runs.items():
            rows[key].append(n / timed(fn, device))
        say(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in rows.items()))
    result = [(f"{name} {k}", statistics.median(v), "") for k, v in rows.items()]
    if args.profile and "engine" in runs:
        profile_engine(runs["engine"], n, device)
    if old_tokens:
        say(f"{name}: generate() (the append cache), {old_tokens} tokens")
        with torch.inference_mode():
            generate(cm, prompt, max_new_tokens=4, temperature=0)
            seconds = timed(lambda: generate(cm, prompt, max_new_tokens=old_tokens, temperature=0), device)
        result.append((f"{name} generate()", old_tokens / seconds, f"{old_tokens} tokens"))
        if args.profile:  # where generate()'s time goes on the host
            profile_host(lambda: generate(cm, prompt, max_new_tokens=old_tokens, temperature=0), old_tokens, device)
        old = generate(cm, prompt, max_new_tokens=old_tokens, temperature=0)[args.prompt:]
        same = next((i for i, (a, b) in enumerate(zip(mine, old)) if a != b), len(old))
        say(f"  engine's greedy tokens equal generate()'s for the first {same} of {len(old)}")
    del engine, hf, cm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [(label, tps, note, params) for label, tps, note in result]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", "gpt2", "llama2-7b"], default="all")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, help="HBM bytes/s for the bound (default: from the card's name)")
    ap.add_argument("--no-compile", action="store_true", help="capture the engine's step without torch.compile")
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few tokens: checks the script on CPU")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more engine run: kernels per token, GPU busy time, the top kernels")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.prompt, args.new_tokens, args.rounds = 8, 16, 2
        torch.set_num_threads(1)
    name, bw = card(device, args.bandwidth)
    say(f"device: {name}, torch {torch.__version__}, {dtype}")
    gpt2 = {} if not args.smoke else {"params.layers": 2, "params.dim": 64, "params.heads": 4, "params.hidden": 128,
                                      "params.vocab": 256, "params.context": 64}
    llama = {} if not args.smoke else {"params.layers": 2, "params.dim": 64, "params.heads": 4, "params.kv_heads": 4,
                                       "params.hidden": 128, "params.vocab": 256, "params.context": 64}
    rows = []
    if args.model in ("all", "gpt2"):
        rows += run_model(args, "gpt2-124m" if not args.smoke else "gpt2-tiny", ROOT / "blueprints/families/gpt2.yaml",
                          gpt2, device, dtype, with_hf=True, old_tokens=args.new_tokens)
    if args.model in ("all", "llama2-7b"):
        rows += run_model(args, "llama2-7b" if not args.smoke else "llama-tiny", ROOT / "blueprints/llama2-7b.yaml",
                          llama, device, dtype, with_hf=False, old_tokens=32 if not args.smoke else 8)
    print()
    print(f"Decode, batch 1, {args.prompt}-token prompt, {args.new_tokens} new tokens (greedy), {dtype}; {name}; "
          f"bound = parameter bytes / {bw / 1e12:.2f} TB/s" if bw else f"Decode on {name}: no bandwidth known, no bound")
    print(f"| {'run':<42} | {'tokens/s':>9} | {'vs transformers':>15} | {'bound tok/s':>11} | {'of bound':>8} | note")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 17}|{'-' * 13}|{'-' * 10}|------")
    base = {r[0].split()[0]: r[1] for r in rows if r[0].endswith("transformers static+compile")}
    for label, tps, note, params in rows:
        bound = bw / params if bw else None
        ref = base.get(label.split()[0])
        print(f"| {label:<42} | {tps:>9,.0f} | {(f'{tps / ref:.2f}x' if ref else '-'):>15} | "
              f"{(f'{bound:,.0f}' if bound else '-'):>11} | {(f'{100 * tps / bound:.1f}%' if bound else '-'):>8} | "
              f"{params / 1e6:,.1f} MB of weights{'; ' + note if note else ''}")
    say("done")


if __name__ == "__main__":
    main()
