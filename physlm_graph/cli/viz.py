"""``viz``, ``plot`` and ``viz-coords``: pictures of a blueprint, of runs, of a checkpoint.

The drawing lives in the library (``physlm_graph._viz``, ``_plot``, ``_viz_coords``); these
subcommands read the inputs (a blueprint, run folders, a checkpoint through the runtime) and
write the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "cmd_viz", "cmd_plot", "cmd_viz_coords"]


def cmd_viz(args: argparse.Namespace) -> int:
    from physlm_graph import PhysLMError, compile_blueprint
    from physlm_graph._viz import render_html, render_svg

    out = Path(args.output)
    if out.suffix.lower() not in (".html", ".htm", ".svg"):
        raise PhysLMError(f"cannot tell the picture format from {out.name!r}", expected=".html or .svg",
                          fix="name the output graph.html or graph.svg")
    cm = compile_blueprint(args.blueprint, overrides=list(args.set or []), device="meta", build=False)
    text = render_svg(cm) if out.suffix.lower() == ".svg" else render_html(cm)
    out.write_text(text, encoding="utf-8")
    if args.json:
        print(json.dumps({"output": str(out), "nodes": len(cm.resolved.nodes), "hash": cm.hash}))
    else:
        print(f"wrote {out} ({len(cm.resolved.nodes)} nodes)", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from physlm_graph._plot import plot_runs

    summary = plot_runs(args.runs, args.output, log_y=args.log)
    if args.json:
        print(json.dumps({"output": args.output, "runs": summary}, indent=2))
    else:
        print(f"wrote {args.output} ({len(summary)} runs)", file=sys.stderr)
    return 0


def _label(tok: Any, i: int) -> str:
    if tok is None:
        return str(i)
    try:
        return repr(tok.decode([i]))[1:-1] or str(i)
    except Exception:
        return str(i)


def cmd_viz_coords(args: argparse.Namespace) -> int:
    from physlm_graph._errors import PhysLMError
    from physlm_graph._viz_coords import pca3, render_coords_html, token_coordinates
    from physlm_graph.runtime.checkpoint import load_checkpoint, model_context, model_vocab

    ck = load_checkpoint(args.checkpoint)
    cm = ck.model
    context = model_context(cm) or 256
    if args.text is not None:
        if ck.tokenizer is None:
            raise PhysLMError("--text needs the checkpoint's tokenizer, and this checkpoint has none",
                              fix="leave out --text to show the whole vocabulary")
        ids = ck.tokenizer.encode(args.text)
    else:
        ids = list(range(min(model_vocab(cm) or 0, args.max_tokens)))
    if not ids:
        raise PhysLMError("no probe tokens", fix="give --text or a model with a vocabulary")
    z, m, layer = token_coordinates(cm, ids, context)
    p, var = pca3(z)
    mass = [float(v) for v in m] if m is not None else [1.0] * len(ids)
    labels = [_label(ck.tokenizer, i) for i in ids]
    note = (f"final coordinates ({layer}.z_next, {z.size(1)} dims) of {len(ids)} tokens, PCA to 3D "
            f"(variance explained {', '.join(f'{v:.0%}' for v in var)}); dot area ~ mass; drag to rotate")
    Path(args.output).write_text(render_coords_html(p, mass, labels, f"{cm.name}: token coordinates", note),
                                 encoding="utf-8")
    if args.json:
        print(json.dumps({"output": args.output, "tokens": len(ids), "layer": layer, "variance": var}))
    else:
        print(f"wrote {args.output} ({len(ids)} tokens)", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    from physlm_graph._cliargs import output_file, positive_int

    v = sub.add_parser("viz", help="draw a blueprint's graph as self-contained HTML or SVG (offline)")
    v.add_argument("blueprint")
    v.add_argument("-o", "--output", required=True, help="graph.html or graph.svg")
    v.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a value (repeatable)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_viz)

    p = sub.add_parser("plot", help="draw training and validation loss curves of runs (metrics.jsonl)")
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    p.add_argument("-o", "--output", required=True, type=output_file(".png", ".svg", ".pdf"),
                   help="curves.png (or .svg, .pdf)")
    p.add_argument("--log", action="store_true", help="logarithmic loss axis")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plot)

    c = sub.add_parser("viz-coords", help="3D view of an NGT checkpoint's token coordinates (self-contained HTML)")
    c.add_argument("checkpoint", help="a checkpoint or run folder")
    c.add_argument("-o", "--output", required=True, help="coords.html")
    c.add_argument("--text", default=None, help="probe text (default: the vocabulary)")
    c.add_argument("--max-tokens", type=positive_int, default=2048, help="at most this many vocabulary tokens")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_viz_coords)
