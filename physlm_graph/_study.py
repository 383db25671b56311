"""Ablation studies, the spec: read and check a study file, and compile its variants.

    physlm-graph ablate examples/ablations/ngt.yaml --out runs/ngt-study

A study file (validated by ``StudyDoc``) names a base blueprint, its variants (each an
``extends`` of the base: ``set``/``replace``/``remove``, or another ``blueprint`` entirely),
the seeds, the baseline variant the others are tested against (default: the first), a budget
(``steps`` or ``tokens``), the data and tokenizer, and training overrides;
what it leaves out comes from each blueprint's ``train:`` section, as ``physlm-graph train``
takes it. ``StudySpec`` compiles every variant on the meta device (no weights) before anything
trains. Running the study is the runtime's part (``physlm_graph.runtime.study``); this module
does not import the runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from physlm_graph._errors import Diagnostic, Loc, PhysLMError
from physlm_graph._schema import Seed

__all__ = ["StudyDoc", "Variant", "Budget", "StudySpec", "VariantSpec", "load_study", "variant_source", "StudyError",
           "is_study_document"]


class StudyError(PhysLMError):
    """A study file that cannot be run, or a run that failed."""

    stage = "study"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Strict):
    """One arm of the study: the base (or ``blueprint``) changed by set/replace/remove."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="folder-safe name")
    about: str = ""
    blueprint: str | None = Field(None, description="another base blueprint for this variant (relative to the study)")
    set: dict[str, Any] = Field(default_factory=dict)
    replace: dict[str, Any] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Budget(_Strict):
    """How long each run trains: optimizer ``steps``, or training ``tokens`` (rounded up to steps)."""

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of `steps` or `tokens`")
        return self


class StudyDoc(_Strict):
    """A study file."""

    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    about: str = ""
    base: str = Field(description="the base blueprint, relative to the study file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="--set overrides applied to every variant")
    variants: list[Variant] = Field(min_length=1)
    baseline: str | None = Field(None, description="the variant the others are tested against (default: the first)")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    budget: Budget | None = Field(None, description="default: each blueprint's train.steps")
    data: str | None = Field(None, description="default: each blueprint's train.data")
    tokenizer: str | None = Field(None, description="default: each blueprint's train.tokenizer")
    train: dict[str, Any] = Field(default_factory=dict, description="train: options for every run (batch_size, lr, ...)")

    @model_validator(mode="after")
    def _unique(self) -> "StudyDoc":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a variant; the variants are: {', '.join(names)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be unique")
        taken = [k for k in ("steps", "seed", "data", "tokenizer") if k in self.train]
        if taken:
            raise ValueError(f"`train` may not set {' or '.join(taken)}: the study says it with `budget`, `seeds`, "
                             "`data` and `tokenizer`")
        return self


# ---------------------------------------------------------------------------- loading
def _near(path: Path, base: Path) -> str:
    return str(path) if path.is_absolute() else os.path.normpath(base / path)


def load_study(path: str | os.PathLike[str]) -> tuple[StudyDoc, Path]:
    """Read and validate a study file; errors carry ``file:line:col``."""
    from physlm_graph._load import load_document

    path = Path(path)
    if not path.is_file():
        raise StudyError("no such study file", loc=Loc(file=str(path)), fix="check the path")
    doc = load_document(path)
    if not is_study_document(doc.data):
        raise StudyError("this is a blueprint, not an ablation study file", loc=doc.loc(("physlm",)),
                         fix=f"train it with `physlm-graph train {path}` or check it with `physlm-graph validate "
                             f"{path}`; a study file has `study:`, `base:` and `variants:` (docs/ablations.md)")
    try:
        study = StudyDoc.model_validate(doc.data)
    except ValidationError as err:
        diags = []
        for e in err.errors():
            where = tuple(e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key {where[-1]!r}"
            diags.append(Diagnostic(f"{'.'.join(map(str, where)) or 'study'}: {msg}", loc=doc.loc(where)))
        raise StudyError(diags) from None
    root = path.resolve().parent
    missing = []
    for key, rel in [("base", study.base)] + [(f"variants.{i}.blueprint", v.blueprint)
                                                for i, v in enumerate(study.variants) if v.blueprint]:
        if not Path(_near(Path(rel), root)).is_file():
            parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
            missing.append(Diagnostic(f"{key}: no such blueprint {rel!r}", loc=doc.loc(parts),
                                      fix=f"paths are relative to the study file ({root})"))
    if missing:
        raise StudyError(missing)
    return study, root


def is_study_document(data: Any) -> bool:
    """False for a document that is a blueprint (``physlm:``, ``nodes:`` or ``extends:`` and no
    ``study:``); True otherwise (a study, or a document too broken to tell: StudyDoc says why)."""
    if not isinstance(data, dict) or "study" in data:
        return True
    return not any(k in data for k in ("physlm", "nodes", "extends"))


def variant_source(study: StudyDoc, root: Path, v: Variant) -> dict[str, Any]:
    """The variant as a blueprint dict that ``extends`` its base (absolute path)."""
    base = Path(_near(Path(v.blueprint or study.base), root)).resolve()
    doc: dict[str, Any] = {"physlm": 1, "extends": str(base), "name": v.name}
    if v.about:
        doc["about"] = v.about
    for key in ("set", "replace", "remove"):
        val = getattr(v, key)
        if val:
            doc[key] = val
    return doc


TOKENIZER_KINDS = ("bytes", "chars")


def _data_path(spec: str, base: Path) -> str:
    """A data spec relative to ``base`` (the study's folder, or the blueprint's for train.data)."""
    if spec.startswith("hf:") or Path(spec).expanduser().is_absolute():
        return spec
    cand = Path(_near(Path(spec), base))
    return str(cand) if cand.exists() or not Path(spec).exists() else spec


def _tokenizer_spec(spec: str, base: Path) -> str:
    if spec in TOKENIZER_KINDS or spec.startswith("bpe:") or Path(spec).is_absolute():
        return spec
    cand = Path(_near(Path(spec), base))
    return str(cand) if cand.exists() else spec


# ---------------------------------------------------------------------------- the variants
@dataclass(frozen=True)
class VariantSpec:
    """One variant, compiled: its blueprint (a dict extending its base), the model on meta, its
    diff against the base, and the data and tokenizer its runs train on."""

    name: str
    source: dict[str, Any]
    blueprint_file: Path  # the variant's base blueprint: its train.data is relative to it
    model: Any  # CompiledModel on the meta device, with the study's overrides
    diff: str
    data: str
    tokenizer: str


def _in_variant(d: Diagnostic, name: str, file: str) -> Diagnostic:
    """A variant's compile error; one located in the variant's own keys (compiled from a dict,
    so ``<dict>``) is located in the study file instead."""
    if d.loc is not None and d.loc.file != "<dict>":
        return Diagnostic(f"variant {name!r}: {d.render()}")
    return Diagnostic(f"variant {name!r}: {replace(d, loc=None).render()}", loc=Loc(file=file))


class StudySpec:
    """A checked study with every variant compiled (meta device) and its train: defaults taken."""

    def __init__(self, study: StudyDoc, root: Path, file: str | os.PathLike[str] | None = None) -> None:
        from physlm_graph._compile import compile_blueprint
        from physlm_graph._diff import diff_models

        self.study, self.root = study, root
        self.file = str(file) if file is not None else str(root)
        # train options also go in as train.* overrides, so shape inference samples the study's seq_len
        self.overrides = {**study.overrides, **{f"train.{k}": v for k, v in study.train.items()}}
        base_path = _near(Path(study.base), root)
        try:
            base = compile_blueprint(base_path, overrides=self.overrides or None, device="meta", build=False)
        except PhysLMError as exc:
            raise StudyError([Diagnostic(f"the base blueprint does not compile: {d.render()}", loc=Loc(file=base_path))
                              for d in exc.diagnostics]) from None
        self.variants: dict[str, VariantSpec] = {}
        self.notes: list[str] = []  # what the study decides over its blueprints, said before the runs
        errors: list[Diagnostic] = []
        for v in study.variants:
            src = variant_source(study, root, v)
            try:
                cm = compile_blueprint(src, overrides=self.overrides or None, device="meta", build=False)
            except PhysLMError as exc:
                errors += [_in_variant(d, v.name, self.file) for d in exc.diagnostics]
                continue
            bp_file = Path(src["extends"])
            cfg = cm.train_config
            if study.data is not None:
                data = _data_path(study.data, root)
            elif cfg.data is not None:
                data = _data_path(cfg.data, bp_file.parent)
            else:
                errors.append(Diagnostic(f"variant {v.name!r}: no training data: the study has no `data` and "
                                         f"{bp_file.name} has no train.data", loc=Loc(file=self.file),
                                         fix="add `data: PATH` to the study (relative to the study file)"))
                continue
            tok = (_tokenizer_spec(study.tokenizer, root) if study.tokenizer is not None
                   else _tokenizer_spec(cfg.tokenizer, bp_file.parent))
            diff = diff_models(base, cm).summary()
            grown, growth = base.blueprint.get("growth"), cm.blueprint.get("growth")
            if grown != growth:  # the model diff compares graphs, not growth schedules
                note = "growth removed" if not growth else "growth added" if not grown else "growth changed"
                diff = note if diff == "identical" else f"{diff}; {note}"
            self.variants[v.name] = VariantSpec(name=v.name, source=src, blueprint_file=bp_file, model=cm,
                                                diff=diff, data=data, tokenizer=tok)
            errors += self._seed_written(v.name, cm)
        if errors:
            raise StudyError(errors)

    def _seed_written(self, name: str, cm: Any) -> list[Diagnostic]:
        """A blueprint's own ``train.seed``: the study's ``seeds`` replace it, which a note says; a
        seed no run uses because the study lists no seeds (the default [0]) is an error at the key."""
        seed = (cm.blueprint.get("train") or {}).get("seed")
        if seed is None or seed in self.study.seeds:
            return []
        if "seeds" in self.study.model_fields_set:
            self.notes.append(f"variant {name!r}: the study's seeds {self.study.seeds} replace its train.seed {seed}")
            return []
        loc = cm.resolved.doc.loc(("train", "seed")) if cm.resolved.doc is not None else None
        return [Diagnostic(f"variant {name!r}: train.seed {seed} is never run: a study runs every variant at its "
                           "`seeds`, [0] when it lists none", loc=loc or Loc(file=self.file),
                           fix=f"list the seeds in the study (seeds: [{seed}]), or drop train.seed from the blueprint")]

    def runs(self) -> list[tuple[str, int]]:
        return [(v.name, s) for v in self.study.variants for s in self.study.seeds]
