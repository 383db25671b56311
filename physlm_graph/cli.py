"""The ``physlm-graph`` command line.

Every command reports user mistakes as ``physlm-graph`` errors (file:line:col, node, expected
vs got, fix) on stderr with exit code 2, never a traceback. ``--json`` gives machine output.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _console(stderr: bool = False) -> Any:
    import shutil

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else max(shutil.get_terminal_size((160, 40)).columns, 160)
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


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
    cm = _compile(args, build=bool(args.code), stage=args.stage)
    if args.json:
        out = cm.to_json()
        if args.code:
            out["code"] = cm.module.code
        print(json.dumps(out, indent=2))
        return 0
    con = _console()
    con.print(build_table(cm))
    if args.code:
        con.print(cm.module.code, markup=False, highlight=False)
    return 0


def _build_stages(args: argparse.Namespace) -> int:
    from rich.table import Table

    from physlm_graph._load import load_document
    from physlm_graph._merge import apply_overrides, merge_extends

    doc = apply_overrides(merge_extends(load_document(args.blueprint)), list(args.set or []))
    stages = doc.data.get("growth") or []
    if not stages:
        from physlm_graph import ResolveError

        raise ResolveError("the blueprint has no `growth` stages", loc=doc.loc(("growth",)))
    rows = []
    for i, st in enumerate(stages):
        cm = _compile(args, build=False, stage=i)
        layers = sum(len(v) for v in cm.resolved.instances.values())
        rows.append({"stage": i, "until": st.get("until") or st.get("until_tokens") or "end",
                     "grow": st.get("grow", "zero_init") if i else "-", "params_set": st.get("params", {}),
                     "layers": layers, "params": cm.num_params, "flops_per_token": cm.flops_per_token})
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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="physlm-graph", description="Compile, train and study LM blueprints.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("build", help="compile a blueprint and print its node table")
    b.add_argument("blueprint")
    b.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a value (repeatable)")
    b.add_argument("--code", action="store_true", help="print the generated GraphModule code")
    b.add_argument("--stage", type=int, default=None, help="build this growth stage")
    b.add_argument("--stages", action="store_true", help="table of all growth stages")
    b.add_argument("--json", action="store_true")
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

    for mod in ("physlm_graph._schema_export", "physlm_graph._viz", "physlm_graph._plot", "physlm_graph._viz_coords"):
        __import__(mod, fromlist=["add_commands"]).add_commands(sub)  # schema, viz, plot, viz-coords

    for mod in ("physlm_graph.runtime.commands", "physlm_graph._study_commands"):
        try:
            m = __import__(mod, fromlist=["add_commands"])
        except ImportError:
            continue
        m.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from physlm_graph._errors import PhysLMError

    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        code = (getattr(args, "fn", None) or args.func)(args)
        return int(code or 0)
    except PhysLMError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal bug: say so plainly, keep the traceback behind --debug
        if args.debug:
            raise
        print(f"physlm-graph internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in physlm-graph; rerun with --debug for the traceback and report it",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
