"""``import`` and ``export``: Hugging Face model folders in and out.

``import HF_FOLDER --out DIR`` turns a transformers ``save_pretrained`` folder of a supported
family into a physlm checkpoint (``physlm_graph._hf_import.import_hf``); ``export CKPT --to hf
--out DIR`` writes a checkpoint as a Hugging Face folder, native when its graph is a family
(``physlm_graph._hf_export.export_hf``). docs/hugging-face.md lists the families.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_commands", "cmd_import", "cmd_export"]


def add_commands(subparsers: Any) -> None:
    """Add ``import`` and ``export`` to an argparse subparsers object."""
    i = subparsers.add_parser("import", help="a Hugging Face model folder (llama, gpt2) as a physlm checkpoint")
    i.add_argument("folder", metavar="HF_FOLDER", help="a save_pretrained folder: config.json + *.safetensors")
    i.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write")
    i.add_argument("--name", default=None, help="the blueprint's name (default: <model_type>-import)")
    i.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' dtype (auto: the one config.json records, as transformers loads it)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(fn=cmd_import)

    e = subparsers.add_parser("export", help="a checkpoint as a Hugging Face model folder")
    e.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder, or a run folder (its last, then best)")
    e.add_argument("--to", choices=["hf"], default="hf", help="the format (hf: a transformers folder)")
    e.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(fn=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    from physlm_graph._hf_import import import_hf

    cm = import_hf(args.folder, args.out, name=args.name, dtype=args.dtype)
    if args.json:
        print(json.dumps({"out": args.out, "blueprint": cm.name, "params": cm.num_params, "hash": cm.hash,
                          "dtype": _dtype_name(cm)}))
    else:
        print(f"wrote {args.out}: blueprint {cm.name}, {cm.num_params:,} parameters ({_dtype_name(cm)})",
              file=sys.stderr)
    return 0


def _dtype_name(cm: Any) -> str:
    return str(next(cm.module.parameters()).dtype).replace("torch.", "")


def cmd_export(args: argparse.Namespace) -> int:
    from physlm_graph._hf_export import export_hf

    r = export_hf(args.checkpoint, args.out)
    if args.json:
        print(json.dumps({"out": str(r.out), "model_type": r.model_type, "files": r.files, "tokenizer": r.tokenizer,
                          "why_physlm": r.why_physlm or None}))
        return 0
    print(f"wrote {r.out} as model_type {r.model_type} ({', '.join(r.files)})", file=sys.stderr)
    if r.model_type == "physlm":
        print(f"  not a native family ({r.why_physlm}); transformers loads it after `import physlm_graph`",
              file=sys.stderr)
    return 0
