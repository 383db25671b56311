"""``import_hf``: a transformers ``save_pretrained`` folder of a known family as a physlm checkpoint.

    import_hf("gpt2-folder", "imported/gpt2")   # blueprint.yaml + model.safetensors + manifest ...

The family comes from ``config.json``'s ``model_type`` (``_hf_families.FAMILIES``); the blueprint
is the family's ``blueprints/families/<type>.yaml`` with the config's params; every weight goes
through the names the components declare (``register(hf=...)``). Weights keep the dtype that
``config.json`` records (``dtype``, formerly ``torch_dtype``), as transformers' ``from_pretrained``
does by default (``dtype="auto"``): a bfloat16 checkpoint imports as bfloat16, weights and compute.
``dtype="float32"`` (or ``bfloat16``, ``float16``) picks one instead. A config that uses
something the family's graph cannot express fails with one located error per missing piece,
before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from physlm_graph._errors import Diagnostic, Loc
from physlm_graph._hf_families import (
    FAMILIES,
    HFError,
    family_blueprint,
    missing_features,
    params_from_config,
    weight_map,
)

__all__ = ["import_hf", "read_hf_config", "read_hf_weights", "hf_blueprint", "load_hf_weights", "is_hf_folder",
           "DTYPES", "import_dtype"]

INDEX = "model.safetensors.index.json"


def read_hf_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """``config.json`` with transformers' defaults filled in (its config class), and its path."""
    path = folder / "config.json"
    if not path.is_file():
        raise HFError("config.json is missing: not a Hugging Face model folder", loc=Loc(file=str(path)),
                      fix="pass a folder written by save_pretrained (config.json + *.safetensors)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HFError(f"config.json is not valid JSON: {err.msg}", loc=Loc(str(path), err.lineno, err.colno)) from None
    raw = _special_floats(raw)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise HFError(f"model_type {model_type!r} is not supported yet", loc=_loc(path, "model_type"),
                      expected=" or ".join(sorted(FAMILIES)), got=str(model_type),
                      fix="see docs/hugging-face.md for the supported families")
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw).to_dict(), path  # older keys (rope_scaling) come converted
    except (KeyError, ValueError, TypeError) as err:
        raise HFError(f"transformers rejects this config: {str(err).strip(chr(34))}", loc=Loc(file=str(path)),
                      fix="check that transformers itself loads the folder (AutoConfig.from_pretrained)") from None


_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_floats(value: Any) -> Any:
    """transformers writes inf and nan in config.json as ``{"__float__": "Infinity"}`` (Mamba-2's
    ``time_step_limit``); its config classes take them back as floats."""
    if isinstance(value, dict):
        if len(value) == 1 and value.get("__float__") in _FLOATS:
            return _FLOATS[value["__float__"]]
        return {k: _special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_special_floats(v) for v in value]
    return value


def _loc(path: Path, key: str) -> Loc:
    from physlm_graph._hf_families import key_loc

    return key_loc(path, key) or Loc(file=str(path))


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index names."""
    from safetensors.torch import load_file

    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFError("no model.safetensors (nor model.safetensors.index.json)", loc=Loc(file=str(folder)),
                      fix="save the model with save_pretrained(..., safe_serialization=True); .bin files are not read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise HFError("a shard named by the index is missing", loc=Loc(file=str(folder / name)))
        tensors.update(load_file(str(folder / name)))
    return tensors


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_dtype(folder: str | Path, dtype: str = "auto") -> torch.dtype:
    """The dtype an import keeps: ``dtype`` itself, or with ``auto`` the one ``config.json`` records
    (float32 when it records none, as transformers then loads)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise HFError(f"unknown dtype {dtype!r}", expected="auto, " + ", ".join(DTYPES), got=str(dtype))
    if dtype != "auto":
        return DTYPES[dtype]
    config, path = read_hf_config(Path(folder))
    raw = config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(raw).replace("torch.", "")
    if name not in DTYPES:
        key = "dtype" if '"dtype"' in path.read_text(encoding="utf-8") else "torch_dtype"
        raise HFError(f"config.json records {key} {name}, which an import does not keep", loc=_loc(path, key),
                      expected=", ".join(DTYPES), got=name, fix="import with --dtype float32 (or bfloat16, float16)")
    return DTYPES[name]


def import_hf(folder: str | Path, out: str | Path, *, name: str | None = None, dtype: str = "auto") -> Any:
    """Import the transformers model in ``folder`` into a physlm checkpoint at ``out``.

    Returns the ``CompiledModel`` (weights loaded, in ``import_dtype(folder, dtype)``). The
    checkpoint holds the blueprint, the weights in that dtype and, when the folder has one, the
    tokenizer; ``load_checkpoint``, ``generate`` and ``train --init-from``/``--resume`` open it
    (``load_checkpoint`` in the stored dtype; a run's own model keeps float32 and reads them into it).
    """
    from physlm_graph._compile import compile_blueprint
    from physlm_graph.runtime.checkpoint import save_checkpoint

    folder, out = Path(folder), Path(out)
    _check_out(out, folder)
    want = import_dtype(folder, dtype)
    cm = compile_blueprint(hf_blueprint(folder, name=name), device="cpu")
    load_hf_weights(cm, folder, dtype=want)
    tokenizer = _tokenizer(folder)
    save_checkpoint(out, cm=cm, tokenizer=tokenizer)
    return cm


def _check_out(out: Path, folder: Path) -> None:
    """Refuse an output that is the model folder itself or anything but a checkpoint (which is replaced)."""
    from physlm_graph.runtime.checkpoint import refuse_foreign_output

    if out.resolve() == folder.resolve():
        raise HFError("the output is the Hugging Face folder being imported", loc=Loc(file=str(out)),
                      fix="pass another folder")
    refuse_foreign_output(out, HFError)


def is_hf_folder(path: Any) -> bool:
    """Whether ``path`` names a folder holding a ``config.json`` (a ``save_pretrained`` folder)."""
    try:
        return Path(path).is_dir() and (Path(path) / "config.json").is_file()
    except (OSError, ValueError, TypeError):
        return False


def hf_blueprint(folder: str | Path, *, name: str | None = None) -> dict[str, Any]:
    """The family blueprint of a transformers folder's ``config.json``, with the config's params
    (named ``<model_type>-import`` unless ``name``). A config the family's graph cannot express
    is one located error per missing piece; no weight is read."""
    folder = Path(folder)
    config, config_file = read_hf_config(folder)
    fam = FAMILIES[config["model_type"]]
    missing = missing_features(fam, config, config_file)
    if missing:
        raise HFError([Diagnostic(msg, loc=loc, fix="docs/hugging-face.md lists what each family supports") for msg, loc in missing])
    params = params_from_config(fam, config, config_file)
    return family_blueprint(fam, params, name=name or f"{fam.model_type}-import",
                            about=f"Imported from {folder.resolve().name} (Hugging Face model_type "
                            f"{fam.model_type}) by physlm-graph import; graph: blueprints/families/{fam.blueprint}.")


def load_hf_weights(cm: Any, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Copy the folder's weights into ``cm.module``, a compiled family blueprint, which becomes
    ``dtype`` (float32: the dtype a compiled blueprint trains in); every tensor that has no
    place, or does not fit, is named."""
    folder = Path(folder)
    config, _ = read_hf_config(folder)
    fam = FAMILIES[config["model_type"]]
    state = _ours(fam, cm, read_hf_weights(folder), folder)
    cm.module.to(dtype)
    with torch.no_grad():
        for key, value in state.items():
            cm.module.get_parameter(key).copy_(value)


def _ours(fam: Any, cm: Any, tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    state = dict(cm.module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems: list[Diagnostic] = []
    for m in weight_map(fam, cm, cm.module):
        absent = [t for t in m.theirs if t not in tensors]
        if absent:
            problems.append(Diagnostic(f"tensor {absent[0]} is missing from the weights", loc=Loc(file=str(folder)),
                                       node=m.ours))
            continue
        try:
            value = m.ours_from([tensors[t] for t in m.theirs])
        except RuntimeError:  # parts that do not stack or concatenate: reported as a misfit below
            value = torch.empty(0)
        want = tuple(state[m.ours].shape)
        if tuple(value.shape) != want:
            problems.append(Diagnostic(f"{' + '.join(m.theirs)} does not fit {m.ours}", loc=Loc(file=str(folder)),
                                       node=m.ours, expected=str(list(want)), got=str(list(value.shape))))
            continue
        out[m.ours] = value  # copy_ casts it to the module's dtype
        used.update(m.theirs)
    aliases = _tied_aliases(fam, cm)
    unused = sorted(k for k in tensors if k not in used and k not in aliases)
    if unused:
        problems.append(Diagnostic(f"{len(unused)} tensors have no place in the {fam.model_type} blueprint: "
                                   f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}",
                                   loc=Loc(file=str(folder)), fix="the folder holds more than its config describes"))
    if problems:
        raise HFError(problems)
    return out


def _tied_aliases(fam: Any, cm: Any) -> set[str]:
    """transformers may save a tied head's weight too (``lm_head.weight``, GPT-NeoX's older
    ``embed_out.weight``); ours shares the embedding's, so those tensors have no place of their
    own. Empty when the head is not tied (then ``lm_head.weight`` is the head's own)."""
    if cm.resolved.params.get("tie_head") is None:
        return set()
    head = next(theirs for ours, theirs, _ in fam.modules if ours == "head")
    return {f"{head}.weight", "lm_head.weight"}


def _tokenizer(folder: Path) -> Any:
    from physlm_graph.runtime.tokenizers import load_tokenizer

    if (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return load_tokenizer(folder)
    return None
