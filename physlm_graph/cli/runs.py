"""``train``, ``generate``, ``eval`` and ``consolidate``: the subcommands that run models or read
their checkpoints (through the runtime).

``physlm_graph.cli`` calls ``add_commands(subparsers)``; each subcommand's handler (stored as
``fn`` on the parsed arguments) returns an exit code. ``PhysLMError``s are raised, not
caught: the top level prints them and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "cmd_train", "cmd_generate", "cmd_eval", "cmd_consolidate"]


def add_commands(subparsers: Any) -> None:
    """Add ``train``, ``generate``, ``eval`` and ``consolidate`` to an argparse subparsers object."""
    from physlm_graph._cliargs import (device, finite_float, nonnegative_float, positive_float, positive_int, seed,
                                       unit_interval)

    p = subparsers.add_parser("train", help="train a blueprint on a text", description="Train a blueprint. "
                              "The blueprint's train: section gives the defaults; these options override them.")
    p.add_argument("blueprint", help="blueprint YAML file")
    p.add_argument("--data", help="training text: a file, a folder, or hf:NAME (default: train.data)")
    p.add_argument("--tokenizer", help="bytes, chars, bpe:N or a tokenizer folder (default: train.tokenizer)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=V",
                   help="override a blueprint value (repeatable), e.g. --set layers=4 or --set train.warmup=50")
    p.add_argument("--out", help="run folder for checkpoints and metrics (default: runs/<blueprint name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last (or best) checkpoint")
    p.add_argument("--init-from", metavar="DIR", help="start from a checkpoint's weights (e.g. one `physlm-graph "
                   "import` wrote): every tensor whose name and shape match is carried, the rest start fresh")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "false"],
                   help="torch.compile the model (train.compile): default, reduce-overhead (each step replayed as "
                        "CUDA graphs), max-autotune, max-autotune-no-cudagraphs, or false; no MODE: default")
    p.add_argument("--seed", type=seed)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--gpus", type=positive_int, help="train on N GPUs of this machine (launches torchrun); with "
                   "--device cpu, N CPU processes over gloo (for testing)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="with several GPUs: DDP (replicated) or FSDP2 (sharded, for models that do not fit)")
    p.set_defaults(fn=cmd_train)

    g = subparsers.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its last, else best)")
    how = g.add_mutually_exclusive_group(required=True)
    how.add_argument("--prompt", help="the text to continue")
    how.add_argument("--interactive", action="store_true", help="read prompts from the terminal until EOF")
    g.add_argument("--max-new-tokens", type=positive_int, default=200)
    g.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=positive_int)
    g.add_argument("--top-p", type=unit_interval)
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    g.add_argument("--seed", type=seed)
    g.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (no KV cache)")
    g.add_argument("--compile", action="store_true",
                   help="decode with the engine: preallocated caches and a one-token step compiled and captured as "
                        "a CUDA graph on a GPU (runtime/decode_engine.py); the same greedy output. With --speculate "
                        "the draft + verify round is captured instead; with --exit-threshold the exits run on the "
                        "engine's caches, uncaptured")
    g.add_argument("--device", type=device, default="auto")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--exit-threshold", type=finite_float, help="early exit: leave at the first exit whose rule reaches T")
    g.add_argument("--exit-rule", choices=["top1", "margin", "entropy", "saturation"], help="early exit rule (default: the blueprint's)")
    g.add_argument("--exit-kv", choices=["lazy", "propagate"],
                   help="early exit: fill skipped layers' KV caches exactly, later (lazy, default) or from the exit "
                        "state (propagate: CALM, saves compute, approximate)")
    g.add_argument("--speculate", type=positive_int, metavar="K",
                   help="self-speculative greedy decoding: draft K tokens per round from an exit, verify them with "
                        "the rest of the model (output = full depth's greedy decoding; needs --temperature 0)")
    g.add_argument("--draft-exit", help="the exit that drafts for --speculate: an exit point (e.g. trunk.1) or its "
                                        "index, shallowest first from 0 (default: the shallowest)")
    g.set_defaults(fn=cmd_generate)

    e = subparsers.add_parser("eval", help="perplexity of a checkpoint on a text")
    e.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its last, else best)")
    e.add_argument("--data", required=True, help="the text: a file, a folder, or hf:NAME")
    e.add_argument("--seq-len", type=positive_int, help="window length (default: the model's context)")
    e.add_argument("--stride", type=positive_int, help="distance between windows (default: seq-len)")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--device", type=device, default="auto")
    e.add_argument("--json", action="store_true")
    e.add_argument("--exit-threshold", type=finite_float, help="score under the early-exit policy at threshold T")
    e.add_argument("--exit-rule", choices=["top1", "margin", "entropy", "saturation"], help="early exit rule (default: the blueprint's)")
    e.set_defaults(fn=cmd_eval)

    c = subparsers.add_parser("consolidate", help="a sharded checkpoint as one full checkpoint folder",
                              description="Write a sharded checkpoint (train.checkpoint_format: sharded) as a full "
                              "checkpoint folder: one model.safetensors, the optimizer state by name, and the same "
                              "blueprint, config, tokenizer and trainer state. generate, eval and export also read "
                              "sharded folders directly.")
    c.add_argument("checkpoint", help="a sharded checkpoint folder, or a run folder (its last, else best)")
    c.add_argument("out", help="the folder to write: a new one, or a checkpoint folder to replace")
    c.add_argument("--no-optimizer", action="store_true", help="leave the optimizer state out (weights only)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_consolidate)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from physlm_graph.runtime.train import train

    import os
    import sys

    if args.gpus is not None and args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        from physlm_graph.cli import make_parser, to_argv
        from physlm_graph.runtime.distributed import check_launch, launch_torchrun

        check_launch(args.gpus, args.device)

        return launch_torchrun(args.gpus, to_argv(make_parser(), args, drop={"gpus"}), device=args.device)
    out = args.out or str(Path("runs") / Path(args.blueprint).stem)
    extra = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    if args.compile == "false":
        args.compile = False
    result = train(args.blueprint, data=args.data, tokenizer=args.tokenizer, steps=args.steps,
                   overrides=args.overrides or None, out_dir=out, resume=args.resume, device=args.device,
                   compile=args.compile, seed=args.seed, progress=not args.no_progress, strategy=args.strategy,
                   init_from=args.init_from, **extra)
    from physlm_graph.runtime.distributed import close_distributed

    close_distributed()  # a torchrun worker leaves the group before exit (gloo's threads aborted at teardown)
    if "RANK" in os.environ and os.environ["RANK"] != "0":
        return 0
    best = result["best_val_loss"]
    Console().print(f"done: {result['steps']} steps, {result['tokens_seen']:,} tokens in {result['wall_s']:.0f} s; "
                    f"best val loss {best:.4f}" if best is not None else "done", highlight=False)
    Console().print(f"checkpoints: {result['last']}" + (f", {result['best']}" if result["best"] else ""), highlight=False)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from physlm_graph._errors import CheckpointError, Loc, PhysLMError

    from physlm_graph.runtime.checkpoint import load_checkpoint
    from physlm_graph.runtime.early_exit import generate_with_exits
    from physlm_graph.runtime.generate import can_cache, generate, sampling_target

    ck = load_checkpoint(args.checkpoint, device=_device(args.device))
    tok = ck.tokenizer
    if tok is None:
        raise CheckpointError("the checkpoint holds no tokenizer/ folder, so text cannot be encoded",
                              loc=Loc(file=str(ck.path)), fix="use a checkpoint written by `physlm-graph train`")
    use_cache = False if args.no_cache else "auto"
    if args.exit_threshold is not None and args.no_cache:
        raise PhysLMError("--exit-threshold decodes with the KV cache; it cannot be combined with --no-cache",
                          fix="drop --no-cache")
    if args.exit_rule is not None and args.exit_threshold is None:
        raise PhysLMError("--exit-rule needs --exit-threshold", fix="add --exit-threshold T")
    if args.exit_kv is not None and args.exit_threshold is None:
        raise PhysLMError("--exit-kv needs --exit-threshold", fix="add --exit-threshold T")
    if args.compile and args.no_cache:
        raise PhysLMError("--compile decodes with the engine's static cache; it cannot be combined with --no-cache",
                          fix="drop one of them")
    if args.draft_exit is not None and args.speculate is None:
        raise PhysLMError("--draft-exit needs --speculate", fix="add --speculate K (e.g. 4)")
    if args.speculate is not None:
        clash = [f for f, on in (("--exit-threshold", args.exit_threshold is not None), ("--no-cache", args.no_cache),
                                 ("--top-k", args.top_k is not None), ("--top-p", args.top_p is not None),
                                 ("--repetition-penalty", args.repetition_penalty != 1.0)) if on]
        if args.temperature != 0:
            clash.insert(0, f"--temperature {args.temperature:g}")
        if clash:
            raise PhysLMError(f"--speculate decodes greedily with the KV cache; it cannot be combined with "
                              f"{', '.join(clash)}", fix="use --temperature 0 and drop the others")
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, use_cache=use_cache, eos_id=tok.eos_id)
    limit = sampling_target(ck)[1]  # a padded vocabulary: only the tokenizer's ids are picked

    def run(prompt: str, seed: int | None) -> int:
        ids = tok.encode(prompt)
        new: list[int] = []
        shown = [0]

        def stream(step_ids: list[int]) -> None:
            new.append(step_ids[0])
            if args.json:
                return
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[shown[0]:])
                sys.stdout.flush()
                shown[0] = len(text)

        if not args.json:
            sys.stdout.write(prompt)
        t0 = time.perf_counter()
        exits = None
        cached = {k: v for k, v in opts.items() if k != "use_cache"}
        if args.speculate is not None:  # self-speculative (runtime/speculative.py; on the engine with --compile)
            from physlm_graph.runtime.speculative import generate_self_speculative
            from physlm_graph.runtime.speculative_engine import generate_speculative_static

            speculate = generate_speculative_static if args.compile else generate_self_speculative
            _, spec = speculate(ck.model, ids, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                                draft_exit=int(args.draft_exit) if (args.draft_exit or "").isdigit()
                                else args.draft_exit, draft_len=args.speculate, on_token=stream,
                                vocab_limit=limit)
            exits = spec.as_dict()
        elif args.exit_threshold is not None:  # early exit (runtime/early_exit.py; on the engine with --compile)
            from physlm_graph.runtime.exit_engine import generate_with_exits_static

            run_exits = generate_with_exits_static if args.compile else generate_with_exits
            _, stats = run_exits(ck.model, ids, seed=seed, on_token=stream, threshold=args.exit_threshold,
                                 rule=args.exit_rule, kv_fill=args.exit_kv or "lazy", vocab_limit=limit, **cached)
            exits = stats.as_dict()
        elif args.compile:  # the decode engine (runtime/decode_engine.py)
            from physlm_graph.runtime.decode_engine import generate_static

            generate_static(ck, ids, seed=seed, on_token=stream, **cached)
        else:
            generate(ck, ids, seed=seed, on_token=stream, **opts)
        seconds = time.perf_counter() - t0
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": tok.decode(new), "prompt_ids": ids, "ids": new,
                              "new_tokens": len(new), "seconds": seconds, "tokens_per_s": len(new) / max(seconds, 1e-9),
                              "cache": bool(use_cache) and can_cache(ck.model), "engine": args.compile,
                              "checkpoint": str(ck.path),
                              **({("speculative" if "draft_exit" in exits else "exits"): exits}
                                 if exits is not None else {})}))
        else:
            text = tok.decode(new)
            sys.stdout.write(text[shown[0]:] + "\n")
            sys.stdout.flush()
            if exits is not None and "draft_exit" in exits:
                print(f"self-speculative: drafts from {exits['draft_exit']} ({exits['draft_layers']} of "
                      f"{exits['full_layers']} layers), {100 * exits['acceptance']:.0f}% of drafts accepted, "
                      f"{exits['tokens_per_round']:.2f} tokens per verification", file=sys.stderr)
            elif exits is not None:
                print(f"early exit: {exits['mean_layers']:.2f} of {exits['full_layers']} layers per token "
                      f"({', '.join(f'{k}: {v}' for k, v in exits['exit_counts'].items())})", file=sys.stderr)
        return 0

    if not args.interactive:
        return run(args.prompt, args.seed)
    seed = args.seed
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if prompt.strip():
            run(prompt.replace("\\n", "\n"), seed)
            seed = None if seed is None else seed + 1


def cmd_eval(args: argparse.Namespace) -> int:
    from physlm_graph.runtime.evaluate import evaluate

    report = evaluate(args.checkpoint, args.data, seq_len=args.seq_len, stride=args.stride,
                      batch_size=args.batch_size, device=_device(args.device), exit_threshold=args.exit_threshold,
                      exit_rule=args.exit_rule)
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"eval {report['checkpoint']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("data", report["data"])
    t.add_row("loss (nats/token)", f"{report['loss']:.4f}")
    t.add_row("perplexity", f"{report['perplexity']:.3f}")
    t.add_row("bits per byte", f"{report['bits_per_byte']:.4f}")
    t.add_row("tokens scored", f"{report['tokens_scored']:,}")
    t.add_row("windows", f"{report['windows']:,} x {report['seq_len']} (stride {report['stride']})")
    t.add_row("tokens/s", f"{report['tokens_per_s']:,.0f}")
    t.add_row("peak memory", f"{report['peak_memory_bytes'] / 2**20:,.1f} MiB ({report['device']})")
    if "exit_rule" in report:
        t.add_row("early exit", f"{report['exit_rule']}, threshold {report['exit_threshold']:g}")
        t.add_row("layers used", f"{report['mean_layers']:.2f} of {report['full_layers']}")
        t.add_row("positions per exit", ", ".join(f"{k}: {v:,}" for k, v in report["exit_counts"].items()))
    Console().print(t)
    return 0



def cmd_consolidate(args: argparse.Namespace) -> int:
    from physlm_graph.runtime.sharded_checkpoint import consolidate

    t0 = time.perf_counter()
    out = consolidate(args.checkpoint, args.out, optimizer=not args.no_optimizer)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    if args.json:
        print(json.dumps({"out": str(out), "files": files, "bytes": size}))
    else:
        print(f"wrote {out} ({len(files)} files, {size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0
