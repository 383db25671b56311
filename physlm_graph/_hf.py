"""``PhysLMConfig`` and ``PhysLMForCausalLM``: a compiled blueprint as a transformers model.

The config carries the blueprint text; the model compiles it (``compile_blueprint``) and holds
the resulting ``GraphModule`` as ``self.model``. Weights are stored exactly as physlm-graph's
own checkpoints store them (``model.safetensors`` keyed by blueprint paths: ``tok.weight``,
``trunk.3.attn.qkv.weight``, tied tensors once), so ``from_pretrained`` and ``save_pretrained``
read and write the checkpoint format directly, and a folder written by either side opens in the
other (``runtime.checkpoint.load_checkpoint`` <-> ``AutoModelForCausalLM.from_pretrained``).

Generation recomputes the whole (cropped) context at every step: the model returns no
``past_key_values`` and ``generate`` is told not to keep a cache (``use_cache=False``). The
incremental path of the runtime (``DecodeContext``) is not wired into transformers' ``Cache``
classes; ``physlm_graph.runtime.generate`` is the fast path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers.configuration_utils import PretrainedConfig
from transformers.generation import GenerationMixin
from transformers.modeling_utils import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from physlm_graph._errors import CheckpointError, Loc, PhysLMError

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
        kwargs.setdefault("use_cache", False)  # generation recomputes; see the module docstring
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

    ``forward(input_ids, labels=None)`` returns ``logits`` (B, T, V) and, with labels, the
    next-token cross-entropy (labels shifted inside, -100 ignored, as in HF models).
    """

    config_class = PhysLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: PhysLMConfig) -> None:
        super().__init__(config)
        if not config.blueprint:
            raise PhysLMError("this PhysLMConfig holds no blueprint",
                              fix="load it from a checkpoint folder (with blueprint.yaml), or use "
                              "PhysLMConfig.from_compiled(compile_blueprint(...))")
        from physlm_graph._compile import compile_blueprint

        cm = compile_blueprint(config.blueprint, device="cpu", stage=getattr(config, "growth_stage", None))
        self.model = cm.module
        self.__dict__["compiled"] = cm  # the CompiledModel (report, blueprint); not a submodule
        self.__dict__["tokenizer_folder"] = None
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights start as the components' builders made them (the blueprint decides)."""

    def get_input_embeddings(self) -> torch.nn.Module | None:
        return None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise PhysLMError("padding (attention_mask with zeros) is not supported: the blueprint's "
                              "positions start at the first token", fix="generate rows of equal length one batch "
                              "at a time, or without padding")
        ctx = self.config.max_position_embeddings
        x = input_ids if not ctx or input_ids.size(1) <= ctx else input_ids[:, -ctx:]  # crop like runtime.generate
        logits = self.model(x)["logits"]  # (B, T, V)
        loss = None
        if labels is not None:
            labels = labels[:, -logits.size(1):]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # the whole sequence: recompute

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, config: Any = None,
                        **kwargs: Any) -> "PhysLMForCausalLM":
        """Open a physlm checkpoint folder (or a run folder's ``last``/``best``) or a save_pretrained folder.

        Accepts ``dtype``/``torch_dtype`` and ``device_map`` (one device); Hub download options are
        ignored: the folder must be local.
        """
        from physlm_graph.runtime.checkpoint import MANIFEST, find_checkpoint, load_weights

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
        if (folder / TOKENIZER / "tokenizer.json").is_file():
            model.__dict__["tokenizer_folder"] = folder / TOKENIZER
        dtype = _dtype(kwargs.get("dtype", kwargs.get("torch_dtype")))
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


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register("physlm", PhysLMConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    register_config()
    AutoModelForCausalLM.register(PhysLMConfig, PhysLMForCausalLM, exist_ok=True)
