"""Tiny studies on tiny CPU models for the study tests (a 1-layer baby GPT of width 16 on a slice
of Shakespeare, chars tokenizer)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def tiny_study(folder: Path, *, variants: list[dict], seeds: list[int], steps: int, train: dict | None = None,
               name: str = "tiny", baseline: str | None = None, chars: int = 20_000) -> Path:
    """Write a study of ``variants`` of a tiny baby GPT into ``folder``; returns the study file."""
    (folder / "text.txt").write_text(DATA.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    (folder / "bp.yaml").write_text(
        f"physlm: 1\nextends: {ROOT / 'blueprints' / 'baby-gpt.yaml'}\nname: tiny\n"
        "params: {vocab: 65, dim: 16, heads: 2, layers: 1, context: 16, dropout: 0.0}\n", encoding="utf-8")
    doc = {"study": name, "base": "bp.yaml", "variants": variants, "seeds": seeds, "budget": {"steps": steps},
           "data": "text.txt", "tokenizer": "chars",
           "train": {"batch_size": 4, "seq_len": 16, "warmup": 1, "eval_every": 5, "eval_iters": 2, "log_every": 1,
                     **(train or {})}}
    if baseline is not None:
        doc["baseline"] = baseline
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
