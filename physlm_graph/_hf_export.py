"""``export_hf``: a physlm checkpoint as a Hugging Face model folder.

A checkpoint whose graph is one of the families (``_hf_families.FAMILIES``) is written as that
native model type: ``config.json`` of transformers' own config class, ``model.safetensors`` in
transformers' names and layouts (from the components' declarations), and the tokenizer when the
checkpoint has one in Hugging Face form. Plain ``transformers`` loads it, without physlm_graph.
Any other graph is written as the ``physlm`` model type (``PhysLMForCausalLM.save_pretrained``),
which needs ``import physlm_graph`` to load.

"One of the families" is decided by the graph, not by names: the checkpoint's params are turned
into the family's config and back into the family blueprint, and the two compiled graphs must be
identical (``diff_models``): every node, component, parameter value and output.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from physlm_graph._errors import Loc
from physlm_graph._hf_families import (
    FAMILIES,
    Family,
    HFError,
    config_from_params,
    family_blueprint,
    params_from_config,
    weight_map,
)

__all__ = ["export_hf", "match_family", "HFExport"]


@dataclass
class HFExport:
    """What ``export_hf`` wrote."""

    out: Path
    model_type: str  # a family's model type, or "physlm"
    files: list[str] = field(default_factory=list)
    why_physlm: str = ""  # when model_type is physlm: why no family matched
    tokenizer: bool = False


def match_family(cm: Any) -> tuple[Family | None, dict[str, Any] | None, str]:
    """The family whose graph ``cm`` is, with its transformers config; else (None, None, why)."""
    from physlm_graph._compile import compile_blueprint
    from physlm_graph._diff import diff_models

    params = dict(cm.resolved.params)
    why = []  # families whose params the blueprint has: why each is not the graph
    short: list[tuple[int, str]] = []  # the others: how many params each lacks, and which
    for fam in FAMILIES.values():
        lacking = [k for k, p in fam.params.items() if k not in params and not p.optional]
        if lacking:
            short.append((len(lacking), f"{fam.model_type}: no param {', '.join(lacking)}"))
            continue
        # an optional param the blueprint lacks (written before the family had it) has the family's default
        defaults = family_blueprint(fam, {}, name="", about="")["params"]
        try:
            config = config_from_params(fam, {k: params.get(k, defaults.get(k)) for k in fam.params})
        except StopIteration:
            why.append(f"{fam.model_type}: a param value transformers cannot spell")
            continue
        doc = family_blueprint(fam, params_from_config(fam, config), name=cm.name, about="")
        try:
            other = compile_blueprint(doc, device="meta", build=False)
        except Exception as err:  # a param value the family's graph rejects: not this family
            why.append(f"{fam.model_type}: {str(err).splitlines()[0]}")
            continue
        d = diff_models(cm, other)
        if d.identical:
            return fam, config, ""
        why.append(f"{fam.model_type}: the graph differs ({d.summary()})")
    if not why and short:  # no family's params all there: name the three closest (fewest missing), not all 15
        why = [text for _, text in sorted(short, key=lambda s: s[0])[:3]]
        rest = len(short) - len(why)
        if rest:
            why.append(f"{rest} other famil{'y lacks' if rest == 1 else 'ies lack'} more params")
    return None, None, "; ".join(why)


def export_hf(checkpoint: str | Path, out: str | Path) -> HFExport:
    """Write the checkpoint at ``checkpoint`` (or a run folder's last/best) as a Hugging Face folder."""
    from physlm_graph.runtime import checkpoint as ckpt

    ck = ckpt.load_checkpoint(checkpoint, tokenizer=False)
    out = Path(out)
    _check_out(out, ck.path)
    # written beside ``out`` and swapped in whole: a failed export keeps the folder that was there,
    # and a new one leaves none of an older export's files behind
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt._recover(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        r = _export_into(ck, tmp)
        ckpt._swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return HFExport(out, r.model_type, r.files, r.why_physlm, r.tokenizer)


def _check_out(out: Path, source: Path) -> None:
    """Refuse an output that would overwrite the checkpoint or anything that is not an HF folder."""
    if out.resolve() == source.resolve() or out.resolve().is_relative_to(source.resolve()):
        raise HFError(f"the output is inside the checkpoint being exported ({source})", loc=Loc(file=str(out)),
                      fix="pass a folder outside the checkpoint")
    if out.exists() and not out.is_dir():
        raise HFError("the output exists and is a file, not a folder", loc=Loc(file=str(out)),
                      fix="pass a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise HFError("the output folder holds other files and is not a Hugging Face folder", loc=Loc(file=str(out)),
                      fix="pass a new or empty folder (an earlier export there would be replaced)")


def _export_into(ck: Any, out: Path) -> HFExport:
    """Write the loaded checkpoint ``ck`` into the empty folder ``out``."""
    from physlm_graph.runtime.checkpoint import TOKENIZER

    fam, config, why = match_family(ck.model)
    if fam is None:
        from physlm_graph._hf import PhysLMForCausalLM

        model = PhysLMForCausalLM.from_compiled(ck.model)
        boundary = None
        padding = _padding_ids(ck)
        if (ck.path / TOKENIZER / "tokenizer.json").is_file():
            model.__dict__["tokenizer_folder"] = ck.path / TOKENIZER
            boundary = _reserve_boundary(model, ck.path / TOKENIZER)
        if padding:
            model.generation_config.suppress_tokens = padding
        model.save_pretrained(out)
        if boundary is not None:
            from physlm_graph.runtime.tokenizers import add_boundary_token

            from physlm_graph.runtime.checkpoint import MANIFEST, write_manifest

            for folder in (out / TOKENIZER, out):
                add_boundary_token(folder, boundary)
            (out / MANIFEST).unlink()
            write_manifest(out)  # the tokenizer files changed
        return HFExport(out, "physlm", sorted(p.name for p in out.iterdir()), why,
                        (out / "tokenizer.json").is_file())
    _write_native(fam, config, ck.model, out)
    padding = _padding_ids(ck)
    if padding:
        from transformers import GenerationConfig

        GenerationConfig(suppress_tokens=padding).save_pretrained(str(out))
    tok = _copy_tokenizer(ck.path / TOKENIZER, out)
    return HFExport(out, fam.model_type, sorted(p.name for p in out.iterdir()), tokenizer=tok)


def _padding_ids(ck: Any) -> list[int]:
    """The ids of a padded vocabulary (``params.vocab`` kept above the tokenizer's size, so the
    table has rows no token uses): they go into the export's ``generation_config.suppress_tokens``,
    so ``generate`` in transformers never produces one, as ours does not. Empty when the
    checkpoint's tokenizer covers every logit (or it has none)."""
    from physlm_graph.runtime.checkpoint import TOKENIZER, model_vocab
    from physlm_graph.runtime.tokenizers import load_tokenizer

    folder = ck.path / TOKENIZER
    total = model_vocab(ck.model)
    if total is None or not folder.is_dir():
        return []
    return list(range(load_tokenizer(folder).vocab_size, total))


def _reserve_boundary(model: Any, folder: Path) -> int | None:
    """The id of the BOS/EOS/PAD token a ``bytes`` or ``chars`` tokenizer gets in Hugging Face form
    (``runtime.tokenizers.add_boundary_token``): the first id past its vocabulary. A model without
    that row gets one, as ``train.vocab_multiple`` pads a vocabulary: ``params.vocab`` one larger and
    ``head.lm``'s ``logit_limit`` at the old size, so the new id is never produced and the model
    computes the same function. None when the tokenizer has an end-of-text token of its own, or
    when the logits do not come straight from ``head.lm`` (no -inf for the new id)."""
    from physlm_graph._hf_ops import input_embeddings, rebuild
    from physlm_graph.runtime.plan import vocab_overrides
    from physlm_graph.runtime.tokenizers import load_tokenizer

    tok = load_tokenizer(folder)
    if tok.eos_id is not None:
        return None
    vocab = tok.vocab_size
    if input_embeddings(model).weight.shape[0] <= vocab:
        overrides, _ = vocab_overrides(model.compiled.blueprint, vocab, vocab + 1)
        if not any(k.endswith(".logit_limit") for k in overrides):
            return None
        rebuild(model, overrides, mean_resizing=True)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = vocab
    return vocab


def _write_native(fam: Family, config: dict[str, Any], cm: Any, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(fam.model_type, **config)
    state = dict(cm.module.named_parameters())
    dtypes = {v.dtype for v in state.values()}
    hf_config.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # what the tensors are (an import's bf16)
    tensors: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[Any]] = {}
    for m in weight_map(fam, cm, cm.module):
        value = state[m.ours].detach()
        for name, part in zip(m.theirs, m.theirs_from(value)):
            if m.rows:  # one piece of a tensor other parameters fill too
                pieces.setdefault(name, []).append((m.rows[0], m.rows[1], part, m))
            else:
                tensors[name] = part.contiguous().cpu()
    for name, got in pieces.items():
        got.sort(key=lambda g: g[0])
        ends = [0] + [g[1] for g in got]
        if [g[0] for g in got] != ends[:-1]:
            raise HFError(f"the parameters that make {name} leave rows out or overlap",
                          node=", ".join(g[3].ours for g in got))
        tensors[name] = torch.cat([g[2] for g in got], dim=1 if got[0][3].transposed else 0).contiguous().cpu()
    hf_config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _copy_tokenizer(folder: Path, out: Path) -> bool:
    """The tokenizer in Hugging Face form (tokenizer.json), when the checkpoint has one."""
    if not (folder / "tokenizer.json").is_file():
        return False
    shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
    if (folder / "tokenizer_config.json").is_file():
        shutil.copyfile(folder / "tokenizer_config.json", out / "tokenizer_config.json")
    else:
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n",
                                                   encoding="utf-8")
    return True
