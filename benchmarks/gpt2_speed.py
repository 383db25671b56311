"""GPT-2 124M training speed on one GPU: the compiled blueprint against an independent
hand-written GPT-2, in the same run, both bf16 + torch.compile + fused AdamW.

MFU as nanoGPT counts it: FLOPs/token = 6 N + 12 L H Q T (N without the position table),
divided by the peak (989 TFLOP/s dense bf16 for H100 SXM / H200, ANCHORS.md).

The two models alternate in rounds of --round steps (A, B, A, B, ...) after their warm-up, and
the table reports each one's median step time, tokens/s and MFU, and the ratio. A round is timed
as a whole (one synchronisation per round, as a training loop runs); ``--sync-each-step``
times single steps instead.

    python benchmarks/gpt2_speed.py [--batch 32] [--seq 1024] [--rounds 6] [--round 10]
        [--variants default:auto:model,default:cudnn:loss,...] [--profile 5]

``--inductor KEY=VALUE,...`` sets inductor options for both models. ``--ab KEY=VALUE,...``
replaces the hand-written model with the blueprint's model compiled under those options (an A/B of
compiler settings, B/A ratio); ``--ab-residual keep|autocast`` makes B the blueprint with that residual
stream (alone or with ``--ab``): ``--residual keep --ab-residual autocast`` is an A/B of the two
streams. ``--second-first`` builds and warms up the second model first: a check that the order
does not decide the ratio (the first-built model ran about 0.3 ms slower on an H100).

``--profile N`` then profiles N steps of the blueprint's model and prints where its GPU time
goes: kernels grouped as matmuls, attention, the optimizer, inductor's Triton kernels and the
rest, each as ms per step and as a share, beside the measured step time (the difference is
time the GPU waits), and the top kernels by time. A diagnosis, not a goal check.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config  # noqa: F401  (--coordinate-descent)
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import kernel_groups, kernel_times  # noqa: E402
from _handgpt import HandGPT  # noqa: E402

from physlm_graph import compile_blueprint  # noqa: E402
from physlm_graph.components.ffn import _gelu_mlp  # noqa: E402
from physlm_graph.components.ffn.mlp import MLP  # noqa: E402
from physlm_graph.components.head._linear_ce import linear_cross_entropy  # noqa: E402
from physlm_graph.runtime.fused_head import fused_lm_loss, split_lm_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEAK = 989e12


def sdpa_context(kind: str):
    if kind == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind])


def make_step(model, opt, physlm: bool, compile_mode: str | None, loss_in_compile: bool, fused: bool = False):
    """One training step. With ``loss_in_compile`` the loss is inside the compiled region, so
    inductor fuses the log-softmax into the head's output instead of materialising fp32 logits.
    ``fused``: the head and the loss as one operation (``linear_cross_entropy``, chunked through
    L2), for both models alike; implies ``loss_in_compile``."""
    if fused:
        if physlm:
            split = split_lm_head(model)
            assert not isinstance(split, str), split

            def forward_loss(x, y):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return fused_lm_loss(split, x, y)[0]
        else:
            def forward_loss(x, y):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return linear_cross_entropy(model.hidden(x), model.lm_head.weight, y)
        loss_in_compile = True
    else:
        def forward_loss(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
                logits = out["logits"] if physlm else out
                return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    if compile_mode is None:
        fwd = forward_loss
    elif loss_in_compile:
        fwd = torch.compile(forward_loss, mode=None if compile_mode == "default" else compile_mode)
    else:
        cmod = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)

        def fwd(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = cmod(x)
                logits = out["logits"] if physlm else out
                return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def step(x, y):
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def blueprint_gpt2(vocab: int, gelu: str, residual: str, fused: bool, device: str):
    """``gpt2-124m.yaml`` compiled with these params, each MLP's GELU in cuBLASLt's epilogues (fused)
    or as its own kernels; stops if the fused path does not reach one MLP per layer."""
    cm = compile_blueprint(ROOT / "blueprints/gpt2-124m.yaml", device=device, overrides={
        "params.vocab": vocab, "params.gelu": gelu, "params.residual": residual})
    mlps = [mod for mod in cm.module.modules() if isinstance(mod, MLP)]
    for mod in mlps:
        mod.fused = fused
    if fused and sum(mod.fused for mod in mlps) != cm.resolved.params["layers"]:
        sys.exit(f"gpt2_speed.py: {sum(mod.fused for mod in mlps)} MLPs take the fused path, expected one per layer")
    return cm


def inductor_settings(text: str, flag: str) -> dict:
    """``KEY=VALUE,...`` (values Python literals) as a dict for ``torch._inductor.config.patch``."""
    out = {}
    for setting in filter(None, text.split(",")):
        key, _, value = setting.partition("=")
        key = key.strip()
        if key not in torch._inductor.config._config:
            sys.exit(f"gpt2_speed.py: {flag}: this torch ({torch.__version__}) has no inductor setting {key!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            sys.exit(f"gpt2_speed.py: {flag}: {setting!r}: the value is not a Python literal")
    return out


def optimizer(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95), fused=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--round", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sync-each-step", action="store_true",
                    help="time every step between two synchronisations (how gpt2_speed.py timed before commit e2873b8); default: "
                         "time each round of --round steps with one synchronisation, as a training loop runs")
    ap.add_argument("--variants", default="default:auto:model",
                    help="comma list of COMPILE_MODE:SDPA:SCOPE, COMPILE_MODE in default|max-autotune-no-cudagraphs|"
                         "reduce-overhead|none, SDPA in auto|flash|cudnn, SCOPE model|loss|fused (loss: loss inside compile; fused: head + loss as one chunked "
                         "operation, both models); an optional fourth field MLP: fused (default: the blueprint's "
                         "tanh GELU inside cuBLASLt's matmul epilogues), tanh (the same GELU as its own kernels) or "
                         "exact (erf GELU, nanoGPT's; the blueprint before commit 276785d)")
    ap.add_argument("--mlp-options", default="",
                    help="comma list of the fused MLP's OPTIONS to switch on (components/ffn/_gelu_mlp.py)")
    ap.add_argument("--coordinate-descent", action="store_true",
                    help="inductor's coordinate-descent tuning of its Triton kernels (longer compilation)")
    ap.add_argument("--inductor", default="", metavar="KEY=VALUE,...",
                    help="inductor config settings for both models, e.g. triton.mix_order_reduction_max_reads=0 "
                         "(values are Python literals)")
    ap.add_argument("--ab", default=None, metavar="KEY=VALUE,...",
                    help="A/B instead of the hand-written model: the blueprint's model twice, the second compiled "
                         "under these inductor settings; prints the B/A tokens/s ratio")
    ap.add_argument("--ab-residual", choices=("keep", "autocast"), default=None,
                    help="A/B instead of the hand-written model: the blueprint's model twice, the second with this "
                         "params.residual (with --ab, under those settings too); prints the B/A tokens/s ratio")
    ap.add_argument("--second-first", action="store_true",
                    help="build, compile and warm up the second model (hand-written, or B) first; a check that the "
                         "order does not decide the ratio")
    ap.add_argument("--residual", choices=("keep", "autocast"), default="autocast",
                    help="the residual stream's dtype for both models (the blueprint's params.residual): autocast "
                         "(bf16 from the embedding on, llm.c's numerics; the blueprint's default since "
                         "commit 86f4393) or keep (fp32 under autocast, nanoGPT's)")
    ap.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublas",
                    help="torch's matmul library for both models (torch.backends.cuda.preferred_blas_library)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N steps of the blueprint's model (GPU time by kernel group)")
    args = ap.parse_args()
    for variant in args.variants.split(","):
        parts = variant.split(":")
        if (len(parts) not in (3, 4) or parts[2] not in ("model", "loss", "fused")
                or parts[1] not in ("auto", "flash", "cudnn") or parts[3:] and parts[3] not in MLP_MODES):
            ap.error(f"--variants: {variant!r} is not COMPILE_MODE:SDPA:SCOPE[:MLP] (SDPA auto|flash|cudnn, "
                     f"SCOPE model|loss|fused, MLP {'|'.join(MLP_MODES)})")
    if args.profile < 0:
        ap.error(f"--profile takes a number of steps >= 1 (0: no profile), not {args.profile}")
    for variant in args.variants.split(","):
        run_variant(args, *variant.split(":"))


MLP_MODES = ("fused", "tanh", "exact")
B_NAME = "physlm-graph gpt2-124m, B"


def under_settings(step, settings: dict):
    def run(x, y):
        with torch._inductor.config.patch(settings):
            return step(x, y)
    return run


def run_variant(args, compile_mode: str, sdpa: str, scope: str, mlp: str = "fused") -> None:
    torch._dynamo.reset()
    if not torch.cuda.is_available():
        sys.exit("gpt2_speed.py: needs a CUDA GPU (none found); nothing to time")
    torch.backends.cuda.preferred_blas_library(args.blas)
    torch._inductor.config.coordinate_descent_tuning = args.coordinate_descent
    torch._inductor.config.patch(inductor_settings(args.inductor, "--inductor")).__enter__()
    for opt in filter(None, args.mlp_options.split(",")):
        if opt not in _gelu_mlp.OPTIONS:
            sys.exit(f"gpt2_speed.py: --mlp-options: {opt!r} is not one of {', '.join(_gelu_mlp.OPTIONS)}")
        _gelu_mlp.OPTIONS[opt] = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda"
    torch.manual_seed(0)
    gelu = "none" if mlp == "exact" else "tanh"
    cm = blueprint_gpt2(args.vocab, gelu, args.residual, mlp == "fused", dev)
    p = cm.resolved.params
    L, H, D, ctx = p["layers"], p["heads"], p["dim"], p["context"]
    hand = HandGPT(args.vocab, ctx, D, H, L, bias=True, gelu=gelu, fused_mlp=mlp == "fused",
                   bf16_residual=args.residual == "autocast").to(dev)
    n_params = cm.num_params - ctx * D
    flops_tok = 6 * n_params + 12 * L * H * (D // H) * args.seq
    models = {"physlm-graph gpt2-124m": (cm.module, True), "hand-written GPT-2": (hand, False)}
    ab = inductor_settings(args.ab, "--ab") if args.ab is not None else None
    is_ab = ab is not None or args.ab_residual is not None
    if is_ab:  # the same blueprint and initialisation, compiled under other settings or with another residual
        del models["hand-written GPT-2"], hand
        torch.manual_seed(0)
        cm_b = blueprint_gpt2(args.vocab, gelu, args.ab_residual or args.residual, mlp == "fused", dev)
        models[B_NAME] = (cm_b.module, True)
    steps = {}
    for name, (m, is_physlm) in models.items():
        m.train()
        steps[name] = make_step(m, optimizer(m), is_physlm, None if compile_mode == "none" else compile_mode,
                                scope in ("loss", "fused"), fused=scope == "fused")
    if ab is not None:  # every call under the settings: compilation (forward, backward) happens inside one
        steps[B_NAME] = under_settings(steps[B_NAME], ab)
    if args.second_first:
        steps = dict(reversed(list(steps.items())))
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    times: dict[str, list[float]] = {k: [] for k in steps}
    with sdpa_context(sdpa):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step(x, y)
            torch.cuda.synchronize()
            print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s (includes compilation)", flush=True)
        for r in range(args.rounds):
            order = list(steps.items()) if r % 2 == 0 else list(reversed(steps.items()))
            for name, step in order:
                if args.sync_each_step:
                    for _ in range(args.round):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        step(x, y)
                        torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - t0)
                else:  # as a training loop runs: the CPU queues step n+1 while the GPU runs step n
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.round):
                        step(x, y)
                    torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - t0) / args.round)
    tokens = args.batch * args.seq
    print()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x {args.seq}, "
          f"vocab {args.vocab}, bf16 autocast, residual {args.residual}, compile={compile_mode} ({scope}), MLP {mlp} {args.mlp_options}, blas {args.blas}, "
          f"{'coordinate-descent tuning, ' if args.coordinate_descent else ''}"
          f"{'inductor ' + args.inductor + ', ' if args.inductor else ''}"
          f"sdpa={sdpa}, fused AdamW, timed {'per step' if args.sync_each_step else f'per round of {args.round} steps'}; "
          f"N={n_params:,} (no wpe), {flops_tok / 1e9:.3f} GFLOP/token, peak 989 TFLOP/s")
    print()
    print("| model | median step (ms) | tokens/s | MFU |")
    print("|---|---:|---:|---:|")
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        mfu = tps * flops_tok / PEAK
        res[name] = tps
        print(f"| {name} | {med * 1e3:.1f} | {tps:,.0f} | {100 * mfu:.1f}% |")
    print()
    if is_ab:
        b_label = ", ".join(filter(None, [args.ab, args.ab_residual and f"residual {args.ab_residual}"]))
        print(f"tokens/s ratio B ({b_label}) / A: {res[B_NAME] / res['physlm-graph gpt2-124m']:.3f}")
        mfu_b = res[B_NAME] * flops_tok / PEAK
        print(f"physlm-graph MFU: A {100 * res['physlm-graph gpt2-124m'] * flops_tok / PEAK:.1f}%, "
              f"B {100 * mfu_b:.1f}% (goal >= 45%)")
    else:
        ratio = res["physlm-graph gpt2-124m"] / res["hand-written GPT-2"]
        print(f"tokens/s ratio physlm-graph / hand-written: {ratio:.3f} (goal >= 0.98)")
        mfu = res["physlm-graph gpt2-124m"] * flops_tok / PEAK
        print(f"physlm-graph MFU: {100 * mfu:.1f}% (goal >= 45%)")
    if args.profile:  # the blueprint's model; with an A/B, B too
        for name in [n for n in steps if n.startswith("physlm-graph")]:
            print(f"\nprofile of {name}:")
            with sdpa_context(sdpa):
                profile_step(steps[name], x, y, args.profile, statistics.median(times[name]))


KINDS = (  # (group, substrings of kernel names), first match wins
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere")),
    ("optimizer", ("multi_tensor", "adam", "optimizer")),
    ("fused head + loss", ("_ce_rows",)),
    ("inductor Triton", ("triton_",)),
)


def profile_step(step, x, y, n: int, step_s: float) -> None:
    """GPU time of n steps by kernel group and the top kernels (torch.profiler)."""
    rows = kernel_times(lambda: step(x, y), n)
    total = sum(ms for ms, _, _ in rows)
    groups = kernel_groups(rows, KINDS)
    print(f"\nprofile of the physlm-graph step ({n} steps): {total:.1f} ms of GPU kernels per step, "
          f"step time {step_s * 1e3:.1f} ms (GPU idle {max(0.0, step_s * 1e3 - total):.1f} ms)")
    print("| kernels | ms/step | share of kernel time |")
    print("|---|---:|---:|")
    for kind, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.2f} | {100 * ms / total:.1f}% |")
    print("\n| ms/step | calls/step | kernel |")
    print("|---:|---:|---|")
    for ms, calls, key in rows[:40]:
        print(f"| {ms:.3f} | {calls} | {key[:100]} |")

if __name__ == "__main__":
    main()
