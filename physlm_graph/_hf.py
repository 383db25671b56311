"""``PhysLMConfig`` and ``PhysLMForCausalLM``: a compiled blueprint as a transformers model.

The config carries the blueprint text; the model compiles it (``compile_blueprint``) and holds
the resulting ``GraphModule`` as ``self.model``. Weights are stored exactly as physlm-graph's
own checkpoints store them (``model.safetensors`` keyed by blueprint paths: ``tok.weight``,
``trunk.3.attn.qkv.weight``, tied tensors once), so ``from_pretrained`` and ``save_pretrained``
read and write the checkpoint format directly, and a folder written by either side opens in the
other (``runtime.checkpoint.load_checkpoint`` <-> ``AutoModelForCausalLM.from_pretrained``).

Incremental decoding uses the components' own decode path (``DecodeContext``) behind
transformers' ``Cache`` interface: ``PhysLMCache`` (``_hf_cache``), which also runs a left-padded
batch per padding group. Fine-tuning helpers (embeddings, resizing, gradient checkpointing) live
in ``_hf_ops``. docs/hugging-face.md describes what is supported and what is refused.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers.configuration_utils import PretrainedConfig
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.modeling_utils import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from physlm_graph import _hf_ops
from physlm_graph._errors import CheckpointError, Loc, PhysLMError
from physlm_graph._hf_cache import PhysLMCache, as_cache, check_positions, padding_of, run_groups

__all__ = ["PhysLMConfig", "PhysLMForCausalLM", "register_config", "register_model"]

BLUEPRINT, MODEL, TOKENIZER = "blueprint.yaml", "model.safetensors", "tokenizer"


class PhysLMConfig(PretrainedConfig):
    """A physlm-graph model for transformers: the merged blueprint text plus HF's usual fields.

    ``blueprint`` is the YAML the model is compiled from. A checkpoint written by the runtime
    keeps it in ``blueprint.yaml`` beside ``config.json``; ``from_pretrained`` reads it from there.
    """

    model_type = "physlm"

    def __init__(self, blueprint: str | None = None, vocab_size: int | None = None,
                 max_position_embeddings: int | None = None, growth_stage: int | None = None, **kwargs: Any) -> None:
        physlm = kwargs.get("physlm")
        if blueprint is None and isinstance(physlm, dict):
            blueprint = physlm.get("blueprint_text")  # a runtime checkpoint's config.json
        self.blueprint = blueprint
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.growth_stage = growth_stage  # the growth stage the weights belong to (None: no growth)
        kwargs.setdefault("use_cache", True)  # forward's default; generate's follows what the graph can do
        kwargs.setdefault("tie_word_embeddings", False)  # ties live in the blueprint (`tie:`)
        super().__init__(**kwargs)

    @classmethod
    def from_compiled(cls, cm: Any) -> "PhysLMConfig":
        """The config of a ``CompiledModel``."""
        from physlm_graph.runtime.checkpoint import model_context, model_vocab

        return cls(blueprint=cm.blueprint_text, vocab_size=model_vocab(cm), max_position_embeddings=model_context(cm),
                   growth_stage=cm.resolved.stage, architectures=["PhysLMForCausalLM"])

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        config, rest = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config.get("blueprint"):
            text = _read_blueprint(_local_folder(pretrained_model_name_or_path, kwargs.get("subfolder") or ""))
            if text is not None:
                config["blueprint"] = text
        return config, rest


def _local_folder(path: Any, subfolder: str = "") -> Path:
    folder = Path(str(path)) / subfolder if subfolder else Path(str(path))
    if not folder.is_dir():
        raise CheckpointError(
            "not a local checkpoint folder", loc=Loc(file=str(folder)),
            fix="pass a folder written by `physlm-graph train` or save_pretrained; for a Hub repository, "
            "download it first (huggingface_hub.snapshot_download) and pass the folder",
        )
    return folder


def _read_blueprint(folder: Path) -> str | None:
    p = folder / BLUEPRINT
    return p.read_text(encoding="utf-8") if p.is_file() else None


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    got = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(got, torch.dtype):
        raise PhysLMError(f"unknown dtype {value!r}", expected="float32, bfloat16, float16 or a torch.dtype")
    return got


class PhysLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A compiled physlm-graph blueprint behind transformers' causal-LM interface.

    ``forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
    use_cache=None, labels=None)`` returns ``logits`` (B, T, V), with labels the next-token
    cross-entropy (labels shifted inside, -100 ignored, as in HF models; in training mode, the
    blueprint's objective: that plus its weighted ``losses`` and exit losses), and with ``use_cache``
    the ``PhysLMCache`` to pass back with the next tokens. Left padding is run per padding group
    (``_hf_cache``), so a padded row gives what its prompt gives alone.
    """

    config_class = PhysLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: PhysLMConfig) -> None:
        super().__init__(config)
        if not config.blueprint:
            raise PhysLMError("this PhysLMConfig holds no blueprint",
                              fix="load it from a checkpoint folder (with blueprint.yaml), or use "
                              "PhysLMConfig.from_compiled(compile_blueprint(...))")
        from physlm_graph._compile import compile_blueprint
        from physlm_graph.runtime.generate import _not_incremental

        cm = compile_blueprint(config.blueprint, device="cpu", stage=getattr(config, "growth_stage", None))
        _apply_init_rules(cm)
        self.model = cm.module
        self.__dict__["compiled"] = cm  # the CompiledModel (report, blueprint); not a submodule
        self.__dict__["tokenizer_folder"] = None
        self.__dict__["not_incremental"] = _not_incremental(cm)  # components that cannot decode a token at a time
        self.__dict__["checkpointing"] = None  # gradient checkpointing: (function, every_n) once enabled
        self.post_init()
        self.generation_config.use_cache = self.can_cache

    def adopt(self, cm: Any) -> None:
        """Hold ``cm`` (a recompiled blueprint, weights already in) in place of the current graph."""
        self.model = cm.module
        self.__dict__["compiled"] = cm
        fresh = PhysLMConfig.from_compiled(cm)
        self.config.blueprint, self.config.vocab_size = fresh.blueprint, fresh.vocab_size

    @property
    def can_cache(self) -> bool:
        """Whether every node the logits depend on decodes incrementally (a ``PhysLMCache`` works)."""
        return not self.not_incremental

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights start as the components' builders made them (the blueprint decides)."""

    # -- embeddings, checkpointing (_hf_ops) -----------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return _hf_ops.input_embeddings(self)

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        _hf_ops.set_input_embeddings(self, value)

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return _hf_ops.output_embeddings(self)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> torch.nn.Module:
        return _hf_ops.resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None,
                                    every_n_layers: int = 1) -> None:
        _hf_ops.set_checkpointing(self, enable, gradient_checkpointing_func, every_n_layers)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpointing is not None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None,
                cache_position: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                past_key_values: Any = None, logits_to_keep: int | torch.Tensor = 0,
                num_items_in_batch: int | torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        _refuse(inputs_embeds is not None, "inputs_embeds", "pass input_ids: the graph starts from token ids")
        _refuse(bool(output_attentions), "output_attentions=True", "leave it off")
        _refuse(bool(output_hidden_states), "output_hidden_states=True", "leave it off")
        _refuse(bool(kwargs), f"{', '.join(sorted(kwargs))}", "leave it out")
        _refuse(input_ids is None, "a call without input_ids", "pass input_ids")
        if cache is not None and past_key_values is not None:
            raise PhysLMError("both cache and past_key_values given", fix="pass one (they are the same argument)")
        cache = as_cache(cache if cache is not None else past_key_values)
        if use_cache is None:  # the config's default where the graph decodes, never while training
            use_cache = bool(getattr(self.config, "use_cache", True)) and self.can_cache \
                and not (self.training and torch.is_grad_enabled())
        if cache is not None and not self.can_cache:
            raise PhysLMError(f"a cache was passed, but these components cannot decode incrementally: "
                              f"{', '.join(self.not_incremental)}", fix="call without past_key_values (and "
                              "use_cache=False): every call runs the whole sequence")
        if use_cache and cache is None:
            if self.can_cache:
                cache = PhysLMCache()
            else:  # asked for explicitly
                _warn_no_cache(self.not_incremental)
        if cache is not None and self.training and torch.is_grad_enabled():
            raise PhysLMError("use_cache in training mode", fix="call model.eval() to decode, or pass use_cache=False")
        objective = labels is not None and self.training and self.has_objective_terms
        outs: list[dict[str, Any]] = []  # the graph's whole output (aux losses, exit logits), for the objective
        hook = self.model.register_forward_hook(lambda m, a, o: outs.append(o)) if objective else None
        try:
            logits = self._logits(input_ids, attention_mask, position_ids, cache, cache_position)
        finally:
            if hook is not None:
                hook.remove()
        loss = None
        if objective:
            loss = self._objective(outs, input_ids, labels, num_items_in_batch)
        elif labels is not None:  # num_items_in_batch (transformers' Trainer): the tokens of all accumulated batches
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100, reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return out if (return_dict if return_dict is not None else getattr(self.config, "return_dict", True)) \
            else out.to_tuple()

    @property
    def has_objective_terms(self) -> bool:
        """Whether the blueprint trains more than the cross-entropy: ``losses`` or ``exits``."""
        return bool(self.compiled.loss_weights) or bool(self.compiled.resolved.exit_points)

    def _objective(self, outs: list[dict[str, Any]], input_ids: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: Any) -> torch.Tensor:
        """The blueprint's training objective (``runtime/objective.py``: the cross-entropy plus the
        weighted ``losses`` and exit losses) over the batch's labels, shifted inside as in HF."""
        from physlm_graph.runtime.objective import Objective

        if len(outs) != 1 or tuple(outs[0]["logits"].shape[:2]) != tuple(input_ids.shape):
            raise PhysLMError("the blueprint's losses and exits are added to the loss from one run of the whole "
                              "batch, but left-padded rows run apart", fix="pad on the right in training "
                              "(tokenizer.padding_side = 'right'), or pack the batches without padding")
        y = torch.full_like(labels, -100)
        y[:, :-1] = labels[:, 1:]  # (B, T): position t predicts token t + 1
        total, _ = Objective(self.compiled.loss_weights)(self.compiled, outs[0], y.to(input_ids.device))
        if num_items_in_batch is not None:  # the sum over this batch's tokens, over all accumulated ones
            total = total * (y != -100).sum() / num_items_in_batch
        return total

    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                cache: PhysLMCache | None, cache_position: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        fed = cache.get_seq_length() if cache is not None else 0  # columns transformers has fed, incl. skipped
        if cache_position is not None and not torch.equal(cache_position.flatten().cpu(), torch.arange(fed, fed + T)):
            raise PhysLMError(f"cache_position {cache_position.flatten().tolist()} does not continue the cache, "
                              f"which holds {fed} positions", fix=f"pass positions {fed}..{fed + T - 1}, or none")
        if mask is None:
            mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        elif mask.dim() != 2 or mask.size(0) != B or mask.size(1) not in (past + T, fed + T):
            raise PhysLMError(f"attention_mask has shape {tuple(mask.shape)}; expected ({B}, {fed + T}): one column "
                              "per token fed so far, this call's included", fix="pass the mask of the whole sequence")
        mask = mask[:, -(past + T):]  # the columns the graph has run (an over-long prompt's cropped ones dropped)
        lead, trail = padding_of(mask)
        if cache is not None and bool(trail.any()):
            raise PhysLMError("right padding (attention_mask ending in zeros) with a cache: the next tokens would "
                              "follow the padding", fix="pad on the left (tokenizer.padding_side = 'left')")
        if cache is not None and cache.batch not in (-1, B):
            raise PhysLMError(f"the cache holds {cache.batch} rows but input_ids has {B}",
                              fix="pass the cache this batch's previous call returned")
        if cache is not None and cache.groups is not None:
            want = torch.empty(B, dtype=torch.long, device=lead.device)
            for g in cache.groups:
                want[g.rows.to(lead.device)] = g.pad
            if not torch.equal(lead, want):
                raise PhysLMError("attention_mask's padding differs from the one the cache was filled with",
                                  fix="pass the mask of the whole sequence, the cached part unchanged")
        if position_ids is not None and not (cache is not None and (cache.windowed or cache.skipped)):
            check_positions(position_ids.reshape(B, -1)[:, -T:], lead, past)
        logits = run_groups(self.model, input_ids, lead, cache=cache, context=self.config.max_position_embeddings)
        if cache is not None:
            cache.seen += T
        return logits

    # -- generation ----------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own PhysLMCache (_prepare_cache_for_generation)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, generation_mode: Any,
                                      batch_size: int, max_cache_length: int) -> None:
        if generation_config.cache_implementation is not None:
            raise PhysLMError(f"cache_implementation={generation_config.cache_implementation!r}: a "
                              "PhysLMForCausalLM keeps the components' own decode state (PhysLMCache)",
                              fix="leave cache_implementation unset")
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        model_kwargs.pop("past_key_values", None)
        if given is not None:
            model_kwargs["cache"] = as_cache(given)
        elif generation_config.use_cache:
            if self.can_cache:
                model_kwargs["cache"] = PhysLMCache()
            else:
                _warn_no_cache(self.not_incremental)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      cache: Any = None, attention_mask: torch.Tensor | None = None,
                                      position_ids: torch.Tensor | None = None, use_cache: bool | None = None,
                                      is_first_iteration: bool | None = False, **kwargs: Any) -> dict[str, Any]:
        """The next call's inputs: the new tokens with a cache; else the whole sequence, its last
        ``context`` columns once it is longer (with a warning), as ``physlm-graph generate`` does."""
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache_position", None)  # derived from the cache
        if cache is not None and cache.get_seq_length() > 0:
            n = next_sequence_length or input_ids.size(1) - cache.get_seq_length()
            input_ids = input_ids[:, -n:]
            position_ids = position_ids[..., -n:] if position_ids is not None else None
        else:
            context = self.config.max_position_embeddings
            if context and input_ids.size(1) > context:  # cut whole columns: each row keeps min(len, context)
                real = attention_mask.sum(1) if attention_mask is not None else torch.full((1,), input_ids.size(1))
                if int(real.max()) > context:
                    _warn_window(context)
                if cache is not None:
                    cache.skipped = input_ids.size(1) - context
                input_ids = input_ids[:, -context:]
                attention_mask = attention_mask[:, -context:] if attention_mask is not None else None
                position_ids = None  # positions restart inside the window
        out = {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask, "position_ids": position_ids,
               "cache": cache, "use_cache": use_cache}
        out.update({k: v for k, v in kwargs.items() if v is not None and k != "labels"})
        return out

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, config: Any = None,
                        **kwargs: Any) -> "PhysLMForCausalLM":
        """Open a physlm checkpoint folder (or a run folder's ``last``/``best``) or a save_pretrained folder.

        Accepts ``dtype``/``torch_dtype`` (``auto``, the default: the stored weights' dtype) and
        ``device_map`` (one device); Hub download options are ignored: the folder must be local.
        """
        from physlm_graph.runtime.checkpoint import MANIFEST, MODEL, find_checkpoint, load_weights, stored_dtype

        folder = find_checkpoint(_local_folder(pretrained_model_name_or_path, kwargs.get("subfolder") or ""))
        if not isinstance(config, PhysLMConfig):
            config = PhysLMConfig.from_pretrained(str(folder))
        if not config.blueprint:
            config.blueprint = _read_blueprint(folder)
        if getattr(config, "growth_stage", None) is None:  # a training run's checkpoint: the stage it reached
            from physlm_graph.runtime.plan import checkpoint_stage

            config.growth_stage = checkpoint_stage(folder)
        model = cls(config)
        load_weights(model.model, folder, verify=(folder / MANIFEST).is_file())
        if (folder / "generation_config.json").is_file():  # special token ids of an export
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
            model.generation_config.use_cache = model.can_cache  # what the graph can do, not what an old file says
        if (folder / TOKENIZER / "tokenizer.json").is_file():
            model.__dict__["tokenizer_folder"] = folder / TOKENIZER
        asked = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
        # auto (transformers' default): as stored; float32 unless an import kept a checkpoint's bf16 or fp16
        dtype = stored_dtype(folder / MODEL) if asked in (None, "auto") else _dtype(asked)
        if dtype is not None:
            model.to(dtype)
        device = kwargs.get("device_map")
        if isinstance(device, (str, torch.device, int)) and device != "auto":
            model.to(device)
        return model.eval()

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """Write a folder both transformers and ``physlm_graph.runtime.checkpoint`` open: weights,
        ``blueprint.yaml``, ``config.json``, ``generation_config.json``, the tokenizer (in
        ``tokenizer/`` and, in HF form, at the top) and ``manifest.json``."""
        from safetensors.torch import save_model

        from physlm_graph.runtime.checkpoint import MANIFEST, write_manifest

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        save_model(self.model, str(out / MODEL), metadata={"format": "pt", "physlm_hash": self.compiled.hash})
        (out / BLUEPRINT).write_text(self.config.blueprint, encoding="utf-8")
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        cfg.setdefault("physlm", {}).update({"hash": self.compiled.hash, "num_params": self.compiled.num_params,
                                             "blueprint_file": BLUEPRINT})
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)
        tok = self.tokenizer_folder
        if tok is not None and Path(tok).resolve() != (out / TOKENIZER).resolve():
            shutil.copytree(tok, out / TOKENIZER, dirs_exist_ok=True)
        if (out / TOKENIZER / "tokenizer.json").is_file():
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (out / TOKENIZER / name).is_file():
                    shutil.copyfile(out / TOKENIZER / name, out / name)
        write_manifest(out)

    @classmethod
    def from_compiled(cls, cm: Any) -> "PhysLMForCausalLM":
        """Wrap a ``CompiledModel`` (its current weights are copied in)."""
        model = cls(PhysLMConfig.from_compiled(cm))
        model.model.load_state_dict(cm.module.state_dict())
        return model


def _apply_init_rules(cm: Any) -> None:
    """``train.init_rules`` over a fresh model, as a training run applies them (from the global
    generator, which the compile drew from too); loaded weights then replace them as they replace
    the components' init."""
    from physlm_graph._errors import TrainingError
    from physlm_graph.runtime.recipe import RecipeError, apply_init_rules, init_rules_from_config

    rules = cm.train_config.init_rules
    if rules:
        try:
            apply_init_rules(cm.module, init_rules_from_config(rules), complete=False)
        except RecipeError as err:
            raise TrainingError(f"train.init_rules: {err}", fix=err.fix) from None


def _refuse(given: bool, what: str, fix: str) -> None:
    if given:
        raise PhysLMError(f"PhysLMForCausalLM.forward does not support {what}", fix=fix)


def _warn_no_cache(names: list[str]) -> None:
    warnings.warn(f"use_cache: these components cannot decode incrementally: {', '.join(names)}; every step "
                  "runs the whole sequence instead (same results, slower)", stacklevel=3)


def _warn_window(context: int) -> None:
    warnings.warn(f"the sequence is longer than the model's context of {context} tokens: each step runs its last "
                  f"{context} tokens (as physlm-graph generate does)", stacklevel=3)


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register("physlm", PhysLMConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    register_config()
    AutoModelForCausalLM.register(PhysLMConfig, PhysLMForCausalLM, exist_ok=True)


from physlm_graph.hf import install_import_hook  # noqa: E402  (what importing transformers here deferred)

install_import_hook()
