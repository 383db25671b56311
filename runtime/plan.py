"""The run plan: what one training run does, decided once from the compiled blueprint.

    plan = make_plan("blueprints/baby-gpt.yaml", overrides=["layers=4"], steps=2000, compile="default")
    plan.config.steps, plan.stages, plan.exits, plan.loss_weights   # everything the trainer follows
    cm, notes = plan.model(vocab=tok.vocab_size, stage=0)          # the model, for a tokenizer (train.fit_vocab)
    groups = plan.optimizer_groups(cm.module)                      # train.optimizers' groups of its parameters

The blueprint is read once (``compile_blueprint(..., build=False)``: loaded, merged with its
``extends`` and overrides, checked); the training options are its ``train:`` section with the
caller's options (``train(steps=...)``, ``--set train.KEY=V``, the CLI's flags) applied. The
trainer, a resumed run, each torchrun worker and a study's runs all start from a plan, so they
all honour the same blueprint: its growth stages, exits, extensions and losses. Later models
(the tokenizer's vocabulary, another growth stage) are compiled from the plan's merged document,
never from the file again.

``train.init_rules`` are applied to every model the plan builds (after the blueprint's own init,
drawn from ``train.seed``), and ``train.optimizers`` are matched against the model's parameter
names when the trainer builds its optimizer: either failing (a pattern matching no parameter, a
parameter in two groups or in none, Muon on a vector) is a TrainingError at the rule's place in
the blueprint file, before step 0.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from physlm_graph._errors import Loc, PhysLMError, TrainingError
from physlm_graph._schema import TrainConfig

__all__ = ["RunPlan", "make_plan", "checkpoint_stage", "vocab_overrides", "normalize_overrides", "TOKENIZER_KINDS"]

TOKENIZER_KINDS = ("bytes", "chars")


def normalize_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """``--set``-style overrides (``["layers=2"]`` or a dict) as a dict."""
    from physlm_graph._merge import parse_override

    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(o) for o in overrides)


def vocab_overrides(doc: dict[str, Any], vocab: int, multiple: int = 1) -> tuple[dict[str, Any], list[str]]:
    """Overrides that fit a blueprint's ``params.vocab`` to a tokenizer of ``vocab`` ids, rounded up
    to ``multiple`` (``train.vocab_multiple``). Padding needs the ``logits`` output to come straight
    from a top-level ``head.lm`` node, whose ``logit_limit`` then gives the padded ids -inf logits;
    otherwise the vocabulary stays unpadded and a note says why. Returns (overrides, notes)."""
    params = doc.get("params") or {}
    if "vocab" not in params:
        return {}, []
    padded = -(-vocab // multiple) * multiple
    out_ref = str((doc.get("outputs") or {}).get("logits", "")).split(".")[0]
    head = (doc.get("nodes") or {}).get(out_ref)
    notes = []
    if padded != vocab and not (isinstance(head, dict) and head.get("use") == "head.lm"):
        notes.append(f"train.vocab_multiple {multiple} not applied: the logits do not come straight from a "
                     "top-level head.lm node, which would give the padded ids -inf logits")
        padded = vocab
    overrides: dict[str, Any] = {}
    if params["vocab"] != padded:
        overrides["params.vocab"] = padded
        why = f"the tokenizer's {vocab} ids, padded to a multiple of {multiple}" if padded != vocab \
            else "the tokenizer's vocabulary"
        notes.append(f"params.vocab set to {padded} ({why}; the blueprint said {params['vocab']})")
    if padded != vocab:
        overrides[f"nodes.{out_ref}.logit_limit"] = vocab
    return overrides, notes


def _train_config(base: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """The blueprint's ``train:`` section with the caller's options applied (None: not given)."""
    updates = {k: v for k, v in updates.items() if v is not None}
    if "compile_mode" in updates:
        mode = updates["compile_mode"]
        raise TrainingError("the training option compile_mode is now the value of compile",
                            fix=f"pass compile={mode!r} (or --compile {mode}, or `compile: {mode}` under train:)")
    unknown = sorted(set(updates) - set(TrainConfig.model_fields))
    if unknown:
        raise TrainingError(f"unknown training option(s): {', '.join(unknown)}",
                            fix=f"use {', '.join(TrainConfig.model_fields)}")
    try:
        return TrainConfig.model_validate({**base.model_dump(), **updates})
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise TrainingError(f"invalid training option: {msgs}") from None


@dataclass
class RunPlan:
    """One run's model and options, from one read of the blueprint (see the module docstring)."""

    source: Any  # the blueprint as given: a path (data paths are relative to its folder), YAML text or a dict
    overrides: dict[str, Any]
    compiled: Any  # the CompiledModel of the merged, checked blueprint (build=False)
    config: TrainConfig
    notes: list[str] = field(default_factory=list)

    # -- what the blueprint asks for
    @property
    def blueprint(self) -> dict[str, Any]:
        """The merged document (extends and overrides applied): what every model is compiled from."""
        return self.compiled.blueprint

    @property
    def name(self) -> str:
        return self.compiled.name

    @property
    def stages(self) -> list[Any]:
        """The growth stages (``GrowthStage``); empty without growth."""
        return list(self.compiled.resolved.spec.growth)

    @property
    def exits(self) -> list[str]:
        """The exit points, shallowest first; empty without exits."""
        return list(self.compiled.resolved.exit_points)

    @property
    def extensions(self) -> list[str]:
        return list(self.compiled.resolved.spec.extensions)

    @property
    def loss_weights(self) -> dict[str, float]:
        """Each auxiliary loss's weight, by name."""
        return dict(self.compiled.loss_weights)

    @property
    def blueprint_dir(self) -> Path | None:
        src = self.source
        if isinstance(src, (str, os.PathLike)) and "\n" not in str(src) and Path(src).is_file():
            return Path(src).resolve().parent
        return None

    @property
    def where(self) -> Loc:
        return Loc(file=str(self.source) if self.blueprint_dir else "<blueprint>")

    # -- what the run reads
    def data_path(self, given: str | None) -> str:
        """``--data`` as given (relative to the working folder), else ``train.data`` relative to
        the blueprint file."""
        if given is not None:
            return str(given)
        spec = self.config.data
        if spec is None:
            raise TrainingError("no training data", loc=self.where, fix="pass --data PATH, or set train.data in the blueprint")
        base = self.blueprint_dir
        if spec.startswith("hf:") or Path(spec).expanduser().is_absolute() or base is None:
            return spec
        if not (base / spec).exists() and Path(spec).exists():
            self.notes.append(f"train.data {spec!r} is not found next to the blueprint; using it relative to the "
                              "working folder")
            return spec
        return os.path.normpath(base / spec)

    def tokenizer_spec(self, given: str | None) -> str:
        """``--tokenizer`` as given, else ``train.tokenizer`` (a folder relative to the blueprint)."""
        spec = given or self.config.tokenizer
        base = self.blueprint_dir
        if given is None and base is not None and spec not in TOKENIZER_KINDS and not spec.startswith("bpe:"):
            if (base / spec).is_dir():
                return str(base / spec)
        return spec

    def _relocated(self, err: PhysLMError) -> PhysLMError:
        """``err`` with the positions of the merged document (``<dict>``: the plan compiles a
        dict) replaced by the node's position in the blueprint file the plan read."""
        res = self.compiled.resolved
        diags = []
        for d in err.diagnostics:
            if d.loc is not None and d.loc.file == "<dict>":
                node = (d.node or "").split(" ")[0]
                loc = res.doc.loc(res.nodes[node].src) if res.doc is not None and node in res.nodes else None
                d = dataclasses.replace(d, loc=loc or self.where)
            diags.append(d)
        return type(err)(diags)

    # -- the recipe
    def _recipe_error(self, err: Any, section: str) -> TrainingError:
        path: tuple[Any, ...] = ("train", section) if err.rule is None else ("train", section, err.rule, err.key)
        loc = self.compiled.resolved.doc.loc(path) if self.compiled.resolved.doc is not None else None
        return TrainingError(f"train.{section}: {err}", loc=loc or self.where, fix=err.fix)

    def optimizer_groups(self, model: Any) -> list[dict[str, Any]]:
        """``train.optimizers`` over ``model``'s parameters (``recipe.select_groups``)."""
        from .recipe import RecipeError, rules_from_config, select_groups

        try:
            return select_groups(model, rules_from_config(self.config.optimizers or []))
        except RecipeError as err:
            raise self._recipe_error(err, "optimizers") from None

    def check_recipe(self) -> None:
        """Match ``train.optimizers`` and ``train.init_rules`` against the parameter names of the
        model on the meta device (no memory, no data), so a wrong rule stops the run before its
        data are read. Later models (another vocabulary, a growth stage) are matched again."""
        if self.config.optimizers is None and not self.config.init_rules:
            return
        from physlm_graph._compile import compile_blueprint

        cm = compile_blueprint(self.blueprint, device="meta", stage=0 if self.stages else None)
        if self.config.optimizers is not None:
            self.optimizer_groups(cm.module)
        self.apply_init_rules(cm.module)  # meta parameters: checked, not drawn

    def apply_init_rules(self, model: Any, *, only: set[str] | None = None, seed: int | None = None) -> list[str]:
        """``train.init_rules`` applied to ``model`` (seeded by ``seed``, default ``train.seed``); the
        names no rule took. ``only``: draw just these parameters (a growth step's fresh layers)."""
        from .recipe import RecipeError, apply_init_rules, init_rules_from_config

        if not self.config.init_rules:
            return []
        try:
            return apply_init_rules(model, init_rules_from_config(self.config.init_rules),
                                    seed=self.config.seed if seed is None else seed, complete=False, only=only)
        except RecipeError as err:
            raise self._recipe_error(err, "init_rules") from None

    def check_init_rules_carried(self, model: Any, carried: set[str]) -> list[str]:
        """``train.init_rules`` against ``--init-from``'s carried tensors (``carried``: names of
        ``model``'s state): a rule whose every parameter the checkpoint replaces would do nothing,
        a TrainingError at the rule; a rule with some carried parameters gets a note (returned)."""
        from .recipe import RecipeError, init_rule_takes, init_rules_from_config

        if not self.config.init_rules:
            return []
        notes = []
        for i, names in enumerate(init_rule_takes(model, init_rules_from_config(self.config.init_rules))):
            over = [n for n in names if n in carried]
            if over and len(over) == len(names):
                shown = ", ".join(over[:4]) + (f", ... ({len(over)} in all)" if len(over) > 4 else "")
                raise self._recipe_error(RecipeError(
                    f"init rule {i} draws only parameters that --init-from carries from the checkpoint ({shown}), "
                    "whose values replace the draw: the rule would do nothing", rule=i,
                    fix="drop the rule (the checkpoint's values are kept), or drop --init-from, or rename the nodes "
                    "the rule should draw so they start fresh"), "init_rules")
            if over:
                notes.append(f"train.init_rules rule {i}: {len(over)} of its {len(names)} parameters are carried by "
                             "--init-from (the checkpoint's values), the others are drawn by the rule")
        return notes

    # -- the model
    def model(self, *, vocab: int, stage: int | None = None, device: str = "cpu",
              tokenizer: str | None = None) -> tuple[Any, list[str]]:
        """The model for a tokenizer of ``vocab`` ids (named ``tokenizer`` in errors; at growth
        ``stage``), seeded by ``train.seed``, from the merged document; returns (CompiledModel, notes).

        With ``train.fit_vocab`` ``params.vocab`` becomes the tokenizer's size (``vocab_overrides``);
        without it the blueprint's vocabulary is kept: more logits than ids is a padded vocabulary
        (ids no token uses: never a target, masked when sampling), fewer is a TrainingError at
        ``params.vocab`` in the blueprint file."""
        from physlm_graph._compile import compile_blueprint

        from .checkpoint import model_vocab

        if self.config.fit_vocab and "vocab" not in (self.blueprint.get("params") or {}):
            doc = self.compiled.resolved.doc
            raise TrainingError("train.fit_vocab is true, but the blueprint has no params.vocab to set",
                                loc=(doc.loc(("train", "fit_vocab")) if doc is not None else None) or self.where,
                                fix="add `vocab: N` to params and use ${vocab} in the embedding and head, or drop "
                                "fit_vocab")
        extra, notes = vocab_overrides(self.blueprint, vocab, self.config.vocab_multiple) \
            if self.config.fit_vocab else ({}, [])
        if stage is None and self.stages:
            stage = 0
        try:
            cm = compile_blueprint(self.blueprint, overrides=extra, stage=stage, seed=self.config.seed, device=device)
        except PhysLMError as err:
            raise self._relocated(err) from None
        cm.resolved.doc = self.compiled.resolved.doc  # locations in the source file, for later errors
        untouched = self.apply_init_rules(cm.module)
        if untouched:
            shown = ", ".join(untouched[:4]) + (f", ... ({len(untouched)} in all)" if len(untouched) > 4 else "")
            notes.append(f"train.init_rules take no rule for {shown}: they keep their component's init")
        mv = model_vocab(cm)
        if mv is not None and mv < vocab:
            raise self.vocab_error(mv, vocab, tokenizer)
        if mv is not None and mv > vocab and not self.config.fit_vocab:
            notes.append(f"params.vocab {mv} is kept for the tokenizer's {vocab} ids: ids {vocab}..{mv - 1} are "
                         "padding (never a target, never sampled)")
        return cm, notes

    def vocab_error(self, model: int, vocab: int, tokenizer: str | None) -> TrainingError:
        """The model's ``model`` logits cannot cover a tokenizer of ``vocab`` ids: where params.vocab
        is written, both numbers and the fixes."""
        doc = self.compiled.resolved.doc
        has_param = isinstance((self.blueprint.get("params") or {}).get("vocab"), int)
        loc = (doc.loc(("params", "vocab")) if has_param else doc.loc(("outputs", "logits"))) if doc is not None \
            else None
        name = f"tokenizer {tokenizer!r}" if tokenizer else "the tokenizer"
        if has_param:
            what = f"params.vocab is {model}, but {name} has {vocab} ids"
            fix = (f"write `vocab: {vocab}` (or more: the extra ids are padding) in params, or --set vocab={vocab}; "
                   "or add `fit_vocab: true` under train: to take the tokenizer's size")
        else:
            what = f"the model's logits cover {model} ids, but {name} has {vocab}"
            fix = (f"add `vocab: {vocab}` to params and use ${{vocab}} in the embedding and head, or --set the "
                   "vocab_size of both")
        return TrainingError(what, loc=loc or self.where, fix=fix)


def make_plan(source: str | os.PathLike[str] | dict[str, Any], *, overrides: dict[str, Any] | list[str] | None = None,
              **train_options: Any) -> RunPlan:
    """Read and check the blueprint once; apply ``train_options`` (``train:`` keys; None: not
    given) over its ``train:`` section."""
    from physlm_graph._compile import compile_blueprint

    ov = normalize_overrides(overrides)
    compiled = compile_blueprint(source, overrides=ov, build=False)
    plan = RunPlan(source=source, overrides=ov, compiled=compiled,
                   config=_train_config(compiled.train_config, train_options))
    plan.check_recipe()
    return plan


def checkpoint_stage(folder: str | os.PathLike[str]) -> int | None:
    """The growth stage a training checkpoint's weights belong to (its ``trainer_state.json``),
    or None (no growth, or not a training checkpoint): what a loader compiles the blueprint at."""
    from .checkpoint import _read_json

    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        return None
    stage = _read_json(path).get("stage")
    return int(stage) if stage is not None else None
