"""Full training-step time of the seed models against a vanilla GPT of the same size.

    python benchmarks/seed_speed.py [--compile] [--iters 20] [--only ngt,holo]
    python benchmarks/seed_speed.py --small          # CPU smoke run (tiny sizes, fp32)

One step = forward + backward + fused AdamW (loss = CE + the blueprint's weighted aux losses),
bf16 autocast on CUDA, train mode (dropout as in the blueprints). Models, written inline as
blueprint dicts and compiled with ``compile_blueprint``, at NGT's 25M configuration (hidden
512, coordinates 64, 8 layers, 8 heads, MLP 2048, block 512, vocab 8192, batch 16 x 512):

- vanilla GPT: learned positions, pre-norm GPT-2 blocks, GELU MLP 2048, tied head;
- NGT: gravity attention faithful (the seed: hard radius, mass in the score), fixed
  inverse_square (soft cutoff) and fixed gaussian (SDPA), with the repulsion loss;
- holographic: the vanilla trunk with attention.holographic (faithful / fixed) as the mixer;
- SSD vs attention per token at T=1024: LLaMA-ish blocks (RMSNorm, SwiGLU) with attention.causal
  (RoPE) vs ssm.ssd as the mixer, batch 8 x 1024 (the same tokens per step).

Goals: gravity <= 1.5x vanilla, holographic <= 1.3x vanilla, SSD <= 2x attention per token
(T = 1024). Candidates are interleaved, CUDA-event timed, median of ``--iters``. With
``--compile`` every model is ``torch.compile``d; graph breaks, recompiles after warm-up and
recompile-limit hits (dynamo then silently runs eagerly) are counted per model, and any of
them prints FAIL and makes the script exit non-zero at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import CompileWatch, describe_device, fmt, pick_device, table, time_interleaved  # noqa: E402

from physlm_graph import compile_blueprint  # noqa: E402

SIZES = {"vocab": 8192, "dim": 512, "coord": 64, "heads": 8, "layers": 8, "hidden": 2048, "context": 512, "dropout": 0.1}
SMALL = {"vocab": 256, "dim": 64, "coord": 16, "heads": 4, "layers": 2, "hidden": 256, "context": 64, "dropout": 0.1}


def gpt(P: dict, mixer: dict | None = None, name: str = "vanilla-gpt") -> dict:
    """nanoGPT-style GPT (learned positions, GELU MLP, tied head); ``mixer`` replaces attention.causal."""
    attn = mixer or {"use": "attention.causal", "num_heads": "${heads}", "dropout": "${dropout}"}
    return {
        "physlm": 1, "name": name, "params": dict(P), "inputs": {"tokens": ["batch", "seq"]},
        "blocks": {"gpt_block": {"nodes": {
            "ln1": {"use": "norm.layer", "in": "x"},
            "attn": {**attn, "in": "ln1"},
            "r1": {"use": "add", "in": ["x", "attn"]},
            "ln2": {"use": "norm.layer", "in": "r1"},
            "mlp": {"use": "ffn.mlp", "in": "ln2", "hidden_dim": "${hidden}", "dropout": "${dropout}"},
            "r2": {"use": "add", "in": ["r1", "mlp"]},
        }, "out": "r2"}},
        "nodes": {
            "tok": {"use": "embed.token", "in": "tokens", "vocab_size": "${vocab}", "embed_dim": "${dim}"},
            "pos": {"use": "embed.learned_position", "in": "tokens", "max_seq_len": "${context}", "embed_dim": "${dim}"},
            "x0": {"use": "add", "in": ["tok", "pos"]},
            "drop": {"use": "misc.dropout", "in": "x0", "p": "${dropout}"},
            "trunk": {"use": "gpt_block", "repeat": "${layers}", "in": "drop"},
            "norm": {"use": "norm.layer", "in": "trunk"},
            "head": {"use": "head.lm", "in": "norm", "vocab_size": "${vocab}", "tie": "tok"},
        },
        "outputs": {"logits": "head"},
        "init": {"scheme": "gpt2", "std": 0.02},
    }


NGT_FAITHFUL = {"mode": "faithful", "cutoff": "hard", "eps": 1.0e-6, "use_rsqrt": False}
NGT_FIXED_INV = {"mode": "fixed", "cutoff": "soft", "softening": 1.0, "cutoff_width": 1.0}
NGT_FIXED_GAUSS = {"mode": "fixed", "kernel": "gaussian", "cutoff": "soft"}


def ngt(P: dict, attn: dict, name: str) -> dict:
    """blueprints/seeds/ngt-25m.yaml, with the gravity attention's mode/kernel parameters swapped."""
    gravity = {"use": "attention.gravity", "in": {"x": "ln1", "z": "z", "mass": "mass"}, "num_heads": "${heads}",
               "head_coord_dim": 16, "gamma_init": 0.0, "radius_init": 4.0, "mass_mode": "score",
               "dropout": "${dropout}", **attn}
    return {
        "physlm": 1, "name": name, "params": dict(P), "inputs": {"tokens": ["batch", "seq"]},
        "blocks": {"ngt_block": {"inputs": ["x", "z"], "nodes": {
            "ln1": {"use": "norm.layer", "in": "x"},
            "attn": gravity,
            "h1": {"use": "add", "in": ["x", "attn"]},
            "ln2": {"use": "norm.layer", "in": "h1"},
            "ffn": {"use": "ffn.mlp", "in": "ln2", "hidden_dim": "${hidden}", "dropout": "${dropout}"},
            "h2": {"use": "add", "in": ["h1", "ffn"]},
            "zsum": {"use": "add", "in": ["z", "attn.z_next"]},
            "lnz": {"use": "norm.layer", "in": "zsum"},
        }, "out": {"x": "h2", "z": "lnz"}}},
        "nodes": {
            "tok": {"use": "embed.token", "in": "tokens", "vocab_size": "${vocab}", "embed_dim": "${dim}"},
            "mass": {"use": "embed.ngt_mass", "in": "tokens", "vocab_size": "${vocab}"},
            "z0": {"use": "embed.ngt_coords", "in": "tokens", "max_len": "${context}", "coord_dim": "${coord}"},
            "trunk": {"use": "ngt_block", "repeat": "${layers}", "in": {"x": "tok", "z": "z0"}},
            "norm": {"use": "norm.layer", "in": "trunk"},
            "head": {"use": "head.lm", "in": "norm", "vocab_size": "${vocab}", "bias": True, "tie": "tok"},
            "repulsion": {"use": "loss.gravity_repulsion", "in": {"z": "trunk.z", "mass": "mass"}, "num_samples": 64,
                          "min_dist2": 1.0e-6, "interval": 1},
        },
        "outputs": {"logits": "head"},
        "losses": {"repulsion": {"from": "repulsion.loss", "weight": 0.05}},
    }


def llama(P: dict, mixer: str, name: str) -> dict:
    """LLaMA-ish: RMSNorm, SwiGLU (hidden 1408), untied head; mixer "attention" (RoPE) or "ssd"."""
    if mixer == "attention":
        mix = {"use": "attention.causal", "in": {"x": "n1", "rope": "rope"}, "num_heads": "${heads}", "bias": False}
    else:
        mix = {"use": "ssm.ssd", "in": "n1"}
    nodes: dict[str, Any] = {"tok": {"use": "embed.token", "in": "tokens", "vocab_size": "${vocab}", "embed_dim": "${dim}"}}
    if mixer == "attention":
        nodes["rope"] = {"use": "embed.rope", "in": "tokens", "head_dim": "${dim / heads}", "max_seq_len": "${context}",
                         "style": "half"}
    nodes |= {
        "trunk": {"use": "llama_block", "repeat": "${layers}", "in": "tok"},
        "norm": {"use": "norm.rms", "in": "trunk"},
        "head": {"use": "head.lm", "in": "norm", "vocab_size": "${vocab}"},
    }
    return {
        "physlm": 1, "name": name, "params": {**P, "hidden": P["hidden"] * 11 // 16}, "inputs": {"tokens": ["batch", "seq"]},
        "blocks": {"llama_block": {"nodes": {
            "n1": {"use": "norm.rms", "in": "x"},
            "mix": mix,
            "r1": {"use": "add", "in": ["x", "mix"]},
            "n2": {"use": "norm.rms", "in": "r1"},
            "ffn": {"use": "ffn.swiglu", "in": "n2", "hidden_dim": "${hidden}"},
            "r2": {"use": "add", "in": ["r1", "ffn"]},
        }, "out": "r2"}},
        "nodes": nodes,
        "outputs": {"logits": "head"},
    }


def models(P: dict, P_long: dict) -> list[tuple[str, str, dict, dict]]:
    """(label, group, blueprint, sizes) ; group = the reference it is compared with."""
    holo = lambda mode: {"use": "attention.holographic", "num_heads": "${heads}", "dropout": "${dropout}", "mode": mode}  # noqa: E731
    return [
        ("vanilla GPT", "vanilla", gpt(P), P),
        ("NGT gravity faithful (seed default)", "vanilla", ngt(P, NGT_FAITHFUL, "ngt-faithful"), P),
        ("NGT gravity fixed inverse_square", "vanilla", ngt(P, NGT_FIXED_INV, "ngt-fixed-inv"), P),
        ("NGT gravity fixed gaussian", "vanilla", ngt(P, NGT_FIXED_GAUSS, "ngt-fixed-gauss"), P),
        ("holographic faithful (vanilla trunk)", "vanilla", gpt(P, holo("faithful"), "holo-faithful"), P),
        ("holographic fixed (vanilla trunk)", "vanilla", gpt(P, holo("fixed"), "holo-fixed"), P),
        ("LLaMA-ish attention, T=long", "llama", llama(P_long, "attention", "llama-attn"), P_long),
        ("LLaMA-ish ssm.ssd, T=long", "llama", llama(P_long, "ssd", "llama-ssd"), P_long),
    ]


GOALS = {"NGT": 1.5, "holographic": 1.3, "ssm.ssd": 2.0}


def goal_for(label: str) -> float | None:
    for k, v in GOALS.items():
        if k in label:
            return v
    return None


def make_step(bp: dict, B: int, T: int, device: torch.device, amp: bool, compile_: bool,
              mode: str = "default", fused_loss: bool = False) -> tuple[Callable[[], None], int]:
    """One training step of ``bp``. ``mode``: torch.compile's mode; ``fused_loss``: compile the
    loss together with the model, as ``physlm-graph train --compile`` does (else the model only,
    with an eager fp32 cross-entropy outside)."""
    cm = compile_blueprint(copy.deepcopy(bp), device=str(device))
    model = cm.module.train()
    weights = dict(cm.loss_weights)
    vocab = bp["params"]["vocab"]
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (B, T), generator=g).to(device)
    y = torch.randint(0, vocab, (B, T), generator=g).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        logits = out["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        for name, term in (out.get("aux") or {}).items():
            loss = loss + weights.get(name, 1.0) * term
        return loss

    kw = {} if mode == "default" else {"mode": mode}
    if compile_ and fused_loss:
        forward_loss = torch.compile(forward_loss, **kw)
    elif compile_:
        model = torch.compile(model, **kw)
    graphs = compile_ and mode == "reduce-overhead"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            loss = forward_loss(x, y)
        loss.backward()
        opt.step()

    return step, nparams


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--T-long", type=int, default=1024, help="sequence length of the SSD-vs-attention pair")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile every model; count graph breaks/recompiles")
    ap.add_argument("--mode", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode (reduce-overhead: the step's kernels replay as CUDA graphs)")
    ap.add_argument("--fused-loss", action="store_true",
                    help="compile the loss with the model, as `physlm-graph train --compile` does")
    ap.add_argument("--only", default="", help="comma-separated substrings of labels to keep (with the reference each is compared with)")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny sizes, fp32")
    args = ap.parse_args()
    device = pick_device()
    amp = device.type == "cuda"
    P = dict(SMALL if args.small else SIZES)
    if args.small:
        args.batch, args.T, args.T_long, args.iters, args.warmup = 2, 64, 128, 3, 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    B, T = args.batch, args.T
    B_long, T_long = max(1, B * T // args.T_long), args.T_long
    P["context"] = T
    P_long = {**P, "context": T_long}
    cands = models(P, P_long)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        chosen = [c for c in cands if any(k in c[0] for k in keep)]
        groups = {c[1] for c in chosen}  # a reference runs only when a model compared with it does
        cands = [c for c in cands if c in chosen or (c[0] in ("vanilla GPT", "LLaMA-ish attention, T=long") and c[1] in groups)]

    how = "eager"
    if args.compile:
        how = f"torch.compile mode {args.mode}" + (", loss compiled with the model" if args.fused_loss else "")
    smoke = " (CPU SMOKE RUN, not a measurement)" if device.type == "cpu" else ""
    print(f"# seed models: full training step (fwd + bwd + AdamW){smoke}")
    print(f"device: {describe_device(device)}")
    print(f"sizes: {P} ; batch {B} x {T} ; SSD pair batch {B_long} x {T_long} ; "
          f"{'bf16 autocast' if amp else 'fp32'}, {how} ; "
          f"median of {args.iters} interleaved steps after {args.warmup} warm-up", flush=True)

    fails: list[str] = []
    with CompileWatch() as watch:
        fns, info, errors = {}, {}, {}
        for label, group, bp, _ in cands:
            bt = (B_long, T_long) if group == "llama" else (B, T)
            try:
                fns[label], n = make_step(bp, *bt, device, amp, args.compile, args.mode, args.fused_loss)
                info[label] = (group, n, bt)
            except Exception as e:  # noqa: BLE001
                errors[label] = f"build: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                print(f"  FAILED to build {label}: {errors[label]}", flush=True)
        # warm up (and compile) model by model, so graph breaks are attributed to each model
        per_model: dict[str, dict[str, int]] = {}
        warm = {}
        for label, fn in fns.items():
            before = watch.snapshot()
            r = time_interleaved({label: fn}, device, warmup=args.warmup, iters=0)[label]
            after = watch.snapshot()
            per_model[label] = {k: after[k] - before[k] for k in after}
            if r.error:
                errors[label] = r.error
            else:
                warm[label] = fn
        before = watch.snapshot()
        res = time_interleaved(warm, device, warmup=0, iters=args.iters, verbose=False)
        after = watch.snapshot()
    during = {k: after[k] - before[k] for k in after}

    ref_ms = {}
    for label, (group, _, _) in info.items():
        if label in ("vanilla GPT", "LLaMA-ish attention, T=long") and label in res and res[label].ms:
            ref_ms[group] = res[label].ms
    rows = []
    for label, group, _, _ in cands:
        r = res.get(label)
        err = errors.get(label) or (r.error if r else None)
        ms = r.ms if r and not err else None
        g_, n, (bb, tt) = info.get(label, (group, 0, (B, T)))
        ratio = ms / ref_ms[group] if ms and ref_ms.get(group) else None
        toks = bb * tt / (ms / 1e3) if ms else None
        goal, note = goal_for(label), []
        verdict = ""
        if goal is not None and ratio is not None:
            verdict = f"<= {goal}x: " + ("ok" if ratio <= goal else "MISSED") if device.type == "cuda" else f"<= {goal}x (CPU: n/a)"
        if args.compile and label in per_model:
            c = per_model[label]
            note.append(f"graphs compiled {c['graphs']}, graph breaks {c['graph_breaks']}")
            if c["graph_breaks"] or c["limit_hits"]:
                fails.append(f"{label}: {c['graph_breaks']} graph break(s), {c['limit_hits']} recompile-limit hit(s)")
                note.append("FAIL")
        if err:
            note.append(f"FAILED ({err})")
        rows.append([label, f"{n / 1e6:.2f}M" if n else "-", f"{bb}x{tt}", fmt(ms, ".1f"), fmt(toks, ",.0f"),
                     fmt(ratio, ".2f") + ("x vs " + ("vanilla" if group == "vanilla" else "llama attn") if ratio else ""),
                     verdict, "; ".join(note)])
    print()
    print(table(["model", "params", "B x T", "step ms", "tokens/s", "ratio", "goal", "note"], rows, "lrrrrrll"))
    if args.compile:
        if during["recompiles"] or during["limit_hits"] or during["graphs"]:
            fails.append(f"compiled during the timed steps: {during}")
        for m in watch.graph_breaks[:10]:
            print(f"graph break: {m}")
        for m in watch.limit_hits[:10]:
            print(f"recompile limit: {m}")
    if errors:
        fails += [f"{k}: {v}" for k, v in errors.items()]
    if fails:
        print()
        for f_ in fails:
            print(f"FAIL {f_}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
