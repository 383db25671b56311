"""``build``, ``validate``, ``components`` and ``schema``: the subcommands about blueprints.

They compile on the meta device (no weights); only ``build --memory`` of a blueprint with
``train.optimizers`` imports the runtime, to match the groups as ``train`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from physlm_graph.cli import console as _console

__all__ = ["add_commands", "cmd_build", "cmd_validate", "cmd_components", "cmd_schema", "build_table", "memory_table"]


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _fmt_flops(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _compile(args: argparse.Namespace, *, build: bool, device: str = "meta", stage: int | None = None) -> Any:
    from physlm_graph import compile_blueprint

    return compile_blueprint(args.blueprint, overrides=list(args.set or []), stage=stage, device=device, build=build)


def build_table(cm: Any, title: str | None = None) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title or f"{cm.name}  (graph {cm.hash})", title_justify="left")
    table.add_column("node")
    table.add_column("component")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("FLOPs/token", justify="right")
    table.add_column("decode")
    for r in cm.report:
        shapes = ", ".join(s if p == "out" else f"{p}: {s}" for p, s in r.out_shapes)
        params = _fmt_int(r.params) + (f" (tied to {r.tied_to})" if r.tied_to else "")
        table.add_row(escape(r.path), r.use, escape(shapes), params, _fmt_flops(r.flops_per_token), cm.decode_kind(r.path))
    table.add_section()
    table.add_row("total", "", f"seq={cm.inferred.sample['seq']}", _fmt_int(cm.num_params), _fmt_flops(cm.flops_per_token))
    return table


def cmd_build(args: argparse.Namespace) -> int:
    if args.stages:
        return _build_stages(args)
    cm = _compile(args, build=bool(args.code or args.memory), stage=args.stage)
    mem = _memory(cm, args) if args.memory else None
    vocab = (cm.blueprint.get("params") or {}).get("vocab")
    if mem is not None and cm.train_config.fit_vocab and vocab is not None:  # the run's vocabulary is not known here
        print(f"note: train.fit_vocab: a run sets params.vocab to its tokenizer's size; this estimate is at "
              f"params.vocab {vocab} (--set vocab=N estimates another)", file=sys.stderr)
    if args.json:
        out = cm.to_json()
        if args.code:
            out["code"] = cm.module.code
        if mem is not None:
            out["memory"] = mem.to_json()
        print(json.dumps(out, indent=2))
        return 0
    con = _console()
    con.print(build_table(cm))
    if mem is not None:
        con.print(memory_table(mem))
    if args.code:
        con.print(cm.module.code, markup=False, highlight=False)
    return 0


def _memory(cm: Any, args: argparse.Namespace) -> Any:
    """The training-memory estimate at the run's batch and window (the blueprint's ``train:``
    unless the options say), bf16 unless ``train.dtype`` is float32, with the optimizer state of
    ``train.optimizers``' groups unless ``--optimizer`` names one for every parameter."""
    from physlm_graph._memory import estimate_memory

    tc = cm.train_config
    batch = args.batch or tc.batch_size
    seq = args.seq or tc.seq_len or cm.inferred.sample["seq"]
    dtype = "float32" if tc.dtype == "float32" else "bfloat16"
    optimizer: Any = args.optimizer or "adamw"
    if args.optimizer is None and tc.optimizers is not None:
        from physlm_graph.runtime.plan import make_plan

        plan = make_plan(args.blueprint, overrides=list(args.set or []))  # a wrong group: located, as in train
        optimizer = {}
        for g in plan.optimizer_groups(cm.module):
            optimizer[g["optimizer"]] = optimizer.get(g["optimizer"], 0) + sum(p.numel() for p in g["params"])
    return estimate_memory(cm, batch=batch, seq=seq, dtype=dtype, world=args.world, optimizer=optimizer,
                           bucket_view=tc.ddp_bucket_view, checkpointing=tc.checkpointing)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_table(m: Any) -> Any:
    """Static memory, each phase of the step on top of it, and the peak (the largest phase)."""
    from rich.table import Table

    ck = "" if m.checkpointing == "none" else f", checkpointing {m.checkpointing}"
    t = Table(title=f"training memory per device: batch {m.batch} x {m.seq} tokens, {m.dtype}, {m.optimizer}{ck} "
              f"(eager, unfused loss; peak = static + the largest phase)", title_justify="left")
    t.add_column("part")
    t.add_column("one device", justify="right")
    t.add_column("DDP", justify="right")
    t.add_column(f"FSDP x{m.world}", justify="right")
    w = max(m.world, 1)
    t.add_row("weights (fp32) and buffers", _gib(m.weights + m.buffers), _gib(m.weights + m.buffers),
              _gib(m.weights // w + m.buffers))
    t.add_row("optimizer state", _gib(m.optimizer_state), _gib(m.optimizer_state), _gib(m.optimizer_state // w))
    t.add_row("gradient buckets / shards", "", _gib(m.gradients), _gib(m.gradients // w))
    t.add_row("gathered blocks (2 x largest)", "", "", _gib(2 * m.largest_block * (2 if m.dtype == "bfloat16" else 4) // 4))
    t.add_section()
    mark = {p: " <" if p == m.peak_phase else "" for p in ("forward", "backward", "step")}
    t.add_row(f"forward: activations ({m.activations_per_token / 1024:.1f} KiB/token), bf16 weight copies, loss",
              _gib(m.forward) + mark["forward"], "", "")
    t.add_row(f"backward: starts with them + loss gradients ({_gib(m.logits_grad)} each)",
              _gib(m.backward) + mark["backward"], "", "")
    t.add_row("step: every gradient", _gib(m.step) + mark["step"], "", "")
    t.add_section()
    t.add_row(f"peak ({m.peak_phase})", _gib(m.single), _gib(m.ddp), _gib(m.fsdp))
    return t


def _build_stages(args: argparse.Namespace) -> int:
    from rich.table import Table

    cm = _compile(args, build=False)
    if not cm.growth_stages:
        from physlm_graph import ResolveError

        raise ResolveError("the blueprint has no `growth` stages", loc=cm.resolved.doc.loc(("growth",)))
    rows = [{"stage": p.index, "until": p.until or p.until_tokens or "end", "grow": p.grow if p.index else "-", "params_set": p.params_set,
             "layers": p.layers, "params": p.num_params, "flops_per_token": p.flops_per_token}
            for p in cm.growth_stages]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    t = Table(title="growth stages", title_justify="left")
    for c in ("stage", "until", "grow", "sets", "layers", "params", "FLOPs/token"):
        t.add_column(c, justify="right" if c in ("layers", "params", "FLOPs/token") else "left")
    for r in rows:
        t.add_row(str(r["stage"]), str(r["until"]), r["grow"], json.dumps(r["params_set"]), str(r["layers"]),
                  _fmt_int(r["params"]), _fmt_flops(r["flops_per_token"]))
    _console().print(t)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from physlm_graph import PhysLMError, compile_blueprint

    failed = 0
    results = []
    for path in args.blueprints:
        try:
            cm = compile_blueprint(path, overrides=list(args.set or []), device="meta", build=False)
            results.append({"blueprint": path, "ok": True, "params": cm.num_params, "hash": cm.hash})
            if not args.json:
                _console().print(f"[green]ok[/green] {path}: {cm.name}, {cm.num_params:,} params")
        except PhysLMError as exc:
            failed += 1
            results.append({"blueprint": path, "ok": False, "errors": [d.render() for d in exc.diagnostics]})
            if not args.json:
                print(str(exc), file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 2 if failed else 0


def cmd_components(args: argparse.Namespace) -> int:
    from rich.table import Table

    from physlm_graph import REGISTRY, PhysLMError

    if args.name:
        info = REGISTRY.get(args.name)
        if info is None:
            near = REGISTRY.suggest(args.name)
            raise PhysLMError(f"unknown component {args.name!r}",
                              fix=f"did you mean {', '.join(near)}?" if near else "run `physlm-graph components`")
        params = []
        for fname, f in info.params.model_fields.items():
            default = "required" if f.is_required() else repr(f.default)
            ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            params.append({"name": fname, "type": ann, "default": default, "doc": f.description or ""})
        data = {"name": info.name, "inputs": list(info.inputs), "optional_inputs": list(info.optional_inputs),
                "outputs": list(info.outputs), "flags": list(info.flags), "doc": info.doc, "params": params,
                "decode": info.decode if isinstance(info.decode, str) else "depends on params",
                "source": info.source}
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        con = _console()
        con.print(f"[bold]{info.name}[/bold]  inputs: {', '.join(info.inputs)}  outputs: {', '.join(info.outputs)}")
        if info.flags:
            con.print("flags: " + "; ".join(info.flags), style="yellow", markup=False)
        con.print(info.doc, markup=False)
        t = Table(title_justify="left")
        for c in ("parameter", "type", "default", "doc"):
            t.add_column(c)
        from rich.markup import escape

        for p in params:
            t.add_row(p["name"], escape(p["type"]), escape(p["default"]), escape(p["doc"]))
        con.print(t)
        return 0
    rows = [{"name": i.name, "inputs": list(i.inputs), "outputs": list(i.outputs), "flags": list(i.flags),
             "summary": (i.doc.splitlines() or [""])[0]} for i in REGISTRY]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title=f"{len(rows)} components", title_justify="left")
    for c in ("name", "inputs", "outputs", "summary"):
        t.add_column(c)
    from rich.markup import escape

    for r in rows:
        summary = escape(r["summary"]) + (f" [yellow]({escape('; '.join(r['flags']))})[/yellow]" if r["flags"] else "")
        t.add_row(r["name"], ", ".join(r["inputs"]), ", ".join(r["outputs"]), summary)
    _console().print(t)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from physlm_graph._schema_export import blueprint_json_schema, write_schema

    text = write_schema(args.output)
    if args.output is None:
        sys.stdout.write(text)
    else:
        n = len(blueprint_json_schema()["definitions"])
        print(f"wrote {args.output} ({n} definitions)", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    from physlm_graph._cliargs import nonnegative_int, positive_int

    b = sub.add_parser("build", help="compile a blueprint and print its node table")
    b.add_argument("blueprint")
    b.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a value (repeatable)")
    b.add_argument("--code", action="store_true", help="print the generated GraphModule code")
    b.add_argument("--stage", type=nonnegative_int, default=None, help="build this growth stage")
    b.add_argument("--stages", action="store_true", help="table of all growth stages")
    b.add_argument("--json", action="store_true")
    b.add_argument("--memory", action="store_true", help="estimate training memory per device (DDP and FSDP)")
    b.add_argument("--batch", type=positive_int, default=None, help="--memory: micro-batch rows (default train.batch_size)")
    b.add_argument("--seq", type=positive_int, default=None, help="--memory: window (default train.seq_len or context)")
    b.add_argument("--world", type=positive_int, default=8, help="--memory: FSDP world size (default 8)")
    b.add_argument("--optimizer", choices=("adamw", "muon", "sgd"), default=None,
                   help="--memory: optimizer whose state to count for every parameter (default: train.optimizers' "
                   "groups, else adamw)")
    b.set_defaults(fn=cmd_build)

    v = sub.add_parser("validate", help="check blueprints; exit 2 listing every error")
    v.add_argument("blueprints", nargs="+")
    v.add_argument("--set", action="append", metavar="PATH=VALUE")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_validate)

    c = sub.add_parser("components", help="list registered components, or show one")
    c.add_argument("name", nargs="?")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_components)

    s = sub.add_parser("schema", help="write the blueprint JSON Schema (for editor completion)")
    s.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    s.set_defaults(fn=cmd_schema)
