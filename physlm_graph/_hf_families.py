"""The Hugging Face model types a blueprint can be imported from and exported to, as data.

A family says three things, none of them code:

- ``blueprint``: the file under ``blueprints/families/`` whose graph is the model type;
- ``params``: each blueprint param and the ``config.json`` key it comes from (a dotted key
  reaches into a nested dict: ``rope_parameters.rope_theta``), with a value map where the two
  spell a value differently (GPT-2's ``gelu_new`` is our ``tanh``) and a default (an expression
  over the params already read) where the config may say ``null``; an ``optional`` key may be
  absent (the param is then null, and export leaves the key out while the param is null);
- ``requires``: config values the graph assumes; any other value is a missing feature, named
  on import (a list in the config compares as a tuple). Export writes the first allowed value, and
  ``writes`` adds values of its own (fixed, or a ``${...}`` expression over the params);
- ``modules``: which node path prefix holds which transformers module prefix (``{i}`` a layer
  index), with the layout of the component's declared names (``HFName``) to use there; where
  the component does not declare the family's layout, the family lists the ``HFName``s itself.

The weights themselves are mapped by the components' own declarations (``register(hf=...)``),
so nothing here is per family code: ``weight_map`` below serves every family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from physlm_graph._errors import Loc, PhysLMError
from physlm_graph._expr import evaluate
from physlm_graph._registry import HFName

# Llama's module layout, which Qwen2 shares: blueprint node -> transformers module, per layer.
_LLAMA_LAYOUT = (
    ("tok", "model.embed_tokens", "default"),
    ("trunk.{i}.n1", "model.layers.{i}.input_layernorm", "default"),
    ("trunk.{i}.attn", "model.layers.{i}.self_attn", "default"),
    ("trunk.{i}.n2", "model.layers.{i}.post_attention_layernorm", "default"),
    ("trunk.{i}.ffn", "model.layers.{i}.mlp", "default"),
    ("norm", "model.norm", "default"),
    ("head", "lm_head", "default"),
)

__all__ = ["Family", "FAMILIES", "FAMILY_DIR", "HFError", "weight_map", "family_blueprint"]

# an installed package ships them as physlm_graph/families/ (setup.py); a checkout keeps them in blueprints/
_INSTALLED = Path(__file__).resolve().parent / "families"
FAMILY_DIR = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[1] / "blueprints" / "families"


class HFError(PhysLMError):
    """A Hugging Face folder or config that cannot be imported (or a model that cannot be exported)."""

    stage = "hugging face"


@dataclass(frozen=True)
class Param:
    key: str  # the config key (dotted: nested)
    values: dict[Any, Any] = field(default_factory=dict)  # config value -> ours (export: the first that gives ours)
    default: Any = None  # when the config says null: an expression over params read before it, or a list
    nullable: bool = False  # null is a value of its own (Mistral's sliding_window: null is full attention)
    optional: bool = False  # absent or null -> the param is null (export writes nothing for null)


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    blueprint: str
    params: dict[str, Param]
    requires: dict[str, tuple[Any, ...]]
    writes: dict[str, Any]
    modules: tuple[tuple[str, str, Any], ...]  # (node path prefix, transformers prefix, layout or HFNames)


def _p(key: str, values: dict[Any, Any] | None = None, default: Any = None, nullable: bool = False,
       optional: bool = False) -> Param:
    return Param(key, values or {}, default, nullable, optional)


class Matcher:
    """A ``requires`` value that accepts a kind of value rather than one value. Export writes none
    (the params, or transformers' own defaults, give the config its value)."""

    __hash__ = None  # type: ignore[assignment]

    def bound(self, config: dict[str, Any]) -> Any:
        """What it matches in this config (itself, unless it reads other keys of the config)."""
        return self


class Repeating(Matcher):
    """A per-layer list that repeats ``kinds`` from layer 0 on, whatever its length (Gemma 2's
    ``layer_types``, which transformers derives from the layer count)."""

    def __init__(self, *kinds: str) -> None:
        self.kinds = kinds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, tuple)) and bool(other) and all(
            t == self.kinds[i % len(self.kinds)] for i, t in enumerate(other))

    def __str__(self) -> str:
        return "[" + ", ".join(self.kinds) + ", ...]"


class WindowLayers(Matcher):
    """Qwen's ``layer_types`` as transformers derives them when the config does not list them, the
    layout the blueprint's ``select`` expresses. qwen2 and qwen3: sliding from ``max_window_layers``
    on, full attention below it and everywhere without a window (``use_sliding_window: false``
    nulls ``sliding_window``). qwen2_moe (``even_below``): sliding in the even layers below
    ``max_window_layers`` when ``use_sliding_window``. A list that says otherwise is refused."""

    def __init__(self, *, even_below: bool = False) -> None:
        self.even_below = even_below

    def bound(self, config: dict[str, Any]) -> tuple[str, ...]:
        start = config.get("max_window_layers") or 0
        n = len(config.get("layer_types") or ())
        if self.even_below:
            on = [bool(config.get("use_sliding_window")) and i % 2 == 0 and i < start for i in range(n)]
        else:
            on = [config.get("sliding_window") is not None and i >= start for i in range(n)]
        return tuple("sliding_attention" if w else "full_attention" for w in on)


class Number(Matcher):
    """Any number, not null (Gemma 2's final_logit_softcapping: its graph has the cap as a node)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (int, float)) and not isinstance(other, bool)

    def __str__(self) -> str:
        return "a number"


# Phi-3's checkpoint fuses q, k, v into qkv_proj (rows [q | k | v], as our attention's qkv) and
# SwiGLU's gate and up into gate_up_proj (rows [gate | up]): names attention.causal and ffn.swiglu
# do not declare, so the family lists them.
_PHI3_NAMES: dict[str, tuple[HFName, ...]] = {
    "trunk.{i}.attn": (HFName("qkv.weight", ("qkv_proj.weight",)), HFName("proj.weight", ("o_proj.weight",))),
    "trunk.{i}.ffn": (HFName("w1.weight", ("gate_up_proj.weight",), rows=("0", "rows")),
                      HFName("w3.weight", ("gate_up_proj.weight",), rows=("rows", "2 * rows")),
                      HFName("w2.weight", ("down_proj.weight",))),
}

# RoPE context extension (embed.rope's scaling), in every family with rotary positions but Phi-3
# (whose config takes only default and longrope): the rope_parameters keys each kind reads, as
# blueprint params that are null where the kind does not read them. DeepSeek's mscale keys and
# the dynamic / longrope kinds are not expressed: refused by name on import.
# All optional: a checkpoint imported before its family had them exports with the defaults (none).
_ROPE_SCALING = {
    "rope_scaling": Param("rope_parameters.rope_type", {"default": "none", "linear": "linear", "llama3": "llama3",
                                                        "yarn": "yarn"}, optional=True),
    "rope_factor": Param("rope_parameters.factor", optional=True),
    "rope_original_context": Param("rope_parameters.original_max_position_embeddings", optional=True),
    "rope_low_freq_factor": Param("rope_parameters.low_freq_factor", optional=True),
    "rope_high_freq_factor": Param("rope_parameters.high_freq_factor", optional=True),
    "yarn_beta_fast": Param("rope_parameters.beta_fast", optional=True),
    "yarn_beta_slow": Param("rope_parameters.beta_slow", optional=True),
    "yarn_attention_factor": Param("rope_parameters.attention_factor", optional=True),
    "yarn_truncate": Param("rope_parameters.truncate", optional=True),
}
# tie_word_embeddings: the head shares the token embedding's table. Every family blueprint's head
# reads ``tie: ${tie_head}``, so the param is the node the head ties to (the family's token
# embedding, ``tok``) or null (a head of its own). Optional: a checkpoint written before the param
# existed has the blueprint's default (see ``match_family``); export writes false for null.
_TIED_HEAD = Param("tie_word_embeddings", {True: "tok", False: None}, optional=True)

_ROPE_SCALING_REQUIRES: dict[str, tuple[Any, ...]] = {"rope_parameters.mscale": (None,),
                                                      "rope_parameters.mscale_all_dim": (None,)}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        model_type="llama",
        architecture="LlamaForCausalLM",
        blueprint="llama.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "attn_bias": _p("attention_bias"), "mlp_bias": _p("mlp_bias"),
            **_ROPE_SCALING,
            "tie_head": _TIED_HEAD,
        },
        requires={"hidden_act": ("silu",), "pretraining_tp": (1,), **_ROPE_SCALING_REQUIRES},
        writes={"attention_dropout": 0.0},
        modules=_LLAMA_LAYOUT,
    ),
    "qwen2": Family(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        blueprint="qwen2.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"),
            "use_window": _p("use_sliding_window", optional=True),
            "window": _p("sliding_window", nullable=True, optional=True),
            "window_layers": _p("max_window_layers", optional=True), "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES, "layer_types": (WindowLayers(),)},
        writes={"attention_dropout": 0.0},
        modules=_LLAMA_LAYOUT,
    ),
    "gpt2": Family(
        model_type="gpt2",
        architecture="GPT2LMHeadModel",
        blueprint="gpt2.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("n_embd"), "heads": _p("n_head"), "layers": _p("n_layer"),
            "context": _p("n_positions"), "hidden": _p("n_inner", default="4 * dim"), "eps": _p("layer_norm_epsilon"),
            "gelu": _p("activation_function", {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}),
            "tie_head": _TIED_HEAD,
        },
        requires={"scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                  "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,)},
        writes={"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
        modules=(
            ("tok", "transformer.wte", "default"),
            ("pos", "transformer.wpe", "default"),
            ("trunk.{i}.ln1", "transformer.h.{i}.ln_1", "default"),
            ("trunk.{i}.attn", "transformer.h.{i}.attn", "conv1d"),
            ("trunk.{i}.ln2", "transformer.h.{i}.ln_2", "default"),
            ("trunk.{i}.mlp", "transformer.h.{i}.mlp", "conv1d"),
            ("norm", "transformer.ln_f", "default"),
            ("head", "lm_head", "default"),
        ),
    ),
    # -- Mistral, Qwen3, Gemma, Gemma 2, OLMo 2: sliding windows, QK-norms, soft-caps, (1 + w) norms
    "mistral": Family(
        model_type="mistral",
        architecture="MistralForCausalLM",
        blueprint="mistral.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "window": _p("sliding_window", nullable=True),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES},
        writes={"attention_dropout": 0.0},
        modules=_LLAMA_LAYOUT,
    ),
    "qwen3": Family(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        blueprint="qwen3.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "attn_bias": _p("attention_bias"),
            "use_window": _p("use_sliding_window", optional=True),
            "window": _p("sliding_window", nullable=True, optional=True),
            "window_layers": _p("max_window_layers", optional=True), "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES, "layer_types": (WindowLayers(),)},
        writes={"attention_dropout": 0.0},
        modules=_LLAMA_LAYOUT,
    ),
    "gemma": Family(
        model_type="gemma",
        architecture="GemmaForCausalLM",
        blueprint="gemma.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "attn_bias": _p("attention_bias"),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("gelu_pytorch_tanh",), **_ROPE_SCALING_REQUIRES,
                  "use_bidirectional_attention": (None, False)},
        writes={"attention_dropout": 0.0},
        modules=_LLAMA_LAYOUT,
    ),
    "gemma2": Family(
        model_type="gemma2",
        architecture="Gemma2ForCausalLM",
        blueprint="gemma2.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "attn_bias": _p("attention_bias"),
            "window": _p("sliding_window"), "query_scalar": _p("query_pre_attn_scalar"),
            "attn_cap": _p("attn_logit_softcapping", nullable=True), "logit_cap": _p("final_logit_softcapping"),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_activation": ("gelu_pytorch_tanh",), **_ROPE_SCALING_REQUIRES,
                  "use_bidirectional_attention": (None, False),
                  "layer_types": (Repeating("sliding_attention", "full_attention"),),
                  "final_logit_softcapping": (Number(),)},
        writes={"attention_dropout": 0.0},
        modules=(
            ("tok", "model.embed_tokens", "default"),
            ("trunk.{i}.n1", "model.layers.{i}.input_layernorm", "default"),
            ("trunk.{i}.attn", "model.layers.{i}.self_attn", "default"),
            ("trunk.{i}.n2", "model.layers.{i}.post_attention_layernorm", "default"),
            ("trunk.{i}.n3", "model.layers.{i}.pre_feedforward_layernorm", "default"),
            ("trunk.{i}.ffn", "model.layers.{i}.mlp", "default"),
            ("trunk.{i}.n4", "model.layers.{i}.post_feedforward_layernorm", "default"),
            ("norm", "model.norm", "default"),
            ("head", "lm_head", "default"),
        ),
    ),
    "olmo2": Family(
        model_type="olmo2",
        architecture="Olmo2ForCausalLM",
        blueprint="olmo2.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "attn_bias": _p("attention_bias"),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES},
        writes={"attention_dropout": 0.0},
        modules=(
            ("tok", "model.embed_tokens", "default"),
            ("trunk.{i}.attn", "model.layers.{i}.self_attn", "default"),
            ("trunk.{i}.n1", "model.layers.{i}.post_attention_layernorm", "default"),
            ("trunk.{i}.ffn", "model.layers.{i}.mlp", "default"),
            ("trunk.{i}.n2", "model.layers.{i}.post_feedforward_layernorm", "default"),
            ("norm", "model.norm", "default"),
            ("head", "lm_head", "default"),
        ),
    ),
    # -- mixture of experts, partial rotary and fused checkpoints --------------------------------
    "mixtral": Family(
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        blueprint="mixtral.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "head_dim": _p("head_dim", default="dim // heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "experts": _p("num_local_experts"),
            "top_k": _p("num_experts_per_tok"), "router_loss": _p("output_router_logits"),
            "router_loss_weight": _p("router_aux_loss_coef"),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES, "sliding_window": (None,),
                  "router_jitter_noise": (0.0, 0)},
        writes={"attention_dropout": 0.0},
        modules=(
            *(m for m in _LLAMA_LAYOUT if m[0] != "trunk.{i}.ffn"),
            ("trunk.{i}.moe", "model.layers.{i}.block_sparse_moe", "mixtral"),
        ),
    ),
    "qwen2_moe": Family(
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        blueprint="qwen2_moe.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "layers": _p("num_hidden_layers"),
            "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"), "qkv_bias": _p("qkv_bias", default="True"),
            "experts": _p("num_experts"), "top_k": _p("num_experts_per_tok"),
            "expert_hidden": _p("moe_intermediate_size"), "shared_hidden": _p("shared_expert_intermediate_size"),
            "norm_topk": _p("norm_topk_prob"), "router_loss": _p("output_router_logits"),
            "router_loss_weight": _p("router_aux_loss_coef"),
            "use_window": _p("use_sliding_window", optional=True),
            "window": _p("sliding_window", nullable=True, optional=True),
            "window_layers": _p("max_window_layers", optional=True), "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES, "layer_types": (WindowLayers(even_below=True),),
                  "decoder_sparse_step": (1,), "mlp_only_layers": ([],)},
        writes={"attention_dropout": 0.0},
        modules=(
            *(m for m in _LLAMA_LAYOUT if m[0] != "trunk.{i}.ffn"),
            ("trunk.{i}.moe", "model.layers.{i}.mlp", "default"),
        ),
    ),
    "phi3": Family(
        model_type="phi3",
        architecture="Phi3ForCausalLM",
        blueprint="phi3.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "kv_heads": _p("num_key_value_heads", default="heads"), "layers": _p("num_hidden_layers"),
            "hidden": _p("intermediate_size"), "context": _p("max_position_embeddings"), "eps": _p("rms_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"),
            "rotary_pct": _p("rope_parameters.partial_rotary_factor", default="1.0"),
            "tie_head": _TIED_HEAD,
        },
        requires={"hidden_act": ("silu",), "rope_parameters.rope_type": ("default",), "sliding_window": (None,)},
        # pad_token_id only makes transformers' embedding keep that row's gradient at zero (our embedding
        # has no such row), and its default 32000 is out of range for a narrower vocabulary
        writes={"attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "pad_token_id": None},
        modules=tuple(
            (ours, theirs, _PHI3_NAMES.get(ours, layout)) for ours, theirs, layout in _LLAMA_LAYOUT
        ),
    ),
    "gpt_neox": Family(
        model_type="gpt_neox",
        architecture="GPTNeoXForCausalLM",
        blueprint="gpt_neox.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "heads": _p("num_attention_heads"),
            "layers": _p("num_hidden_layers"), "hidden": _p("intermediate_size"),
            "context": _p("max_position_embeddings"), "eps": _p("layer_norm_eps"),
            "rope_base": _p("rope_parameters.rope_theta"),
            "rotary_pct": _p("rope_parameters.partial_rotary_factor", default="1.0"),
            "attn_bias": _p("attention_bias"), "gelu": _p("hidden_act", {"gelu": "none", "gelu_new": "tanh"}),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"use_parallel_residual": (True,), **_ROPE_SCALING_REQUIRES},
        writes={"attention_dropout": 0.0, "hidden_dropout": 0.0},
        modules=(
            ("tok", "gpt_neox.embed_in", "default"),
            ("trunk.{i}.ln1", "gpt_neox.layers.{i}.input_layernorm", "default"),
            ("trunk.{i}.attn", "gpt_neox.layers.{i}.attention", (
                HFName("qkv.weight", ("query_key_value.weight",), layout="heads3"),
                HFName("qkv.bias", ("query_key_value.bias",), layout="heads3"),
                HFName("proj.weight", ("dense.weight",)), HFName("proj.bias", ("dense.bias",)))),
            ("trunk.{i}.ln2", "gpt_neox.layers.{i}.post_attention_layernorm", "default"),
            ("trunk.{i}.mlp", "gpt_neox.layers.{i}.mlp", (
                HFName("fc.weight", ("dense_h_to_4h.weight",)), HFName("fc.bias", ("dense_h_to_4h.bias",)),
                HFName("proj.weight", ("dense_4h_to_h.weight",)), HFName("proj.bias", ("dense_4h_to_h.bias",)))),
            ("norm", "gpt_neox.final_layer_norm", "default"),
            ("head", "embed_out", "default"),
        ),
    ),
    # -- state-space families: Mamba-2, and the hybrids Jamba (Mamba-1 + attention + MoE) and Bamba --
    "mamba2": Family(
        model_type="mamba2",
        architecture="Mamba2ForCausalLM",
        blueprint="mamba2.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "layers": _p("num_hidden_layers"),
            "d_state": _p("state_size"), "expand": _p("expand"), "head_dim": _p("head_dim"), "groups": _p("n_groups"),
            "conv": _p("conv_kernel"), "chunk": _p("chunk_size"), "eps": _p("layer_norm_epsilon"),
            "bias": _p("use_bias"), "conv_bias": _p("use_conv_bias"), "tie_head": _TIED_HEAD,
        },
        # time_step_limit clamps dt; (0, inf) is no clamp. residual_in_fp32 and rescale_prenorm_residual
        # are not required: our residual stream is float32 (what residual_in_fp32 asks for, and the same
        # function in float32 either way), and the rescaling is an initialisation only.
        requires={"hidden_act": ("silu",), "time_step_limit": ((0.0, float("inf")),)},
        writes={"num_heads": "${expand * dim // head_dim}", "residual_in_fp32": True},
        modules=(
            ("tok", "backbone.embeddings", "default"),
            ("trunk.{i}.norm", "backbone.layers.{i}.norm", "default"),
            ("trunk.{i}.mixer", "backbone.layers.{i}.mixer", "default"),
            ("norm", "backbone.norm_f", "default"),
            ("head", "lm_head", "default"),
        ),
    ),
    "jamba": Family(
        model_type="jamba",
        architecture="JambaForCausalLM",
        blueprint="jamba.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "layers": _p("num_hidden_layers"),
            "heads": _p("num_attention_heads"), "kv_heads": _p("num_key_value_heads", default="heads"),
            "hidden": _p("intermediate_size"), "eps": _p("rms_norm_eps"),
            "d_state": _p("mamba_d_state"), "conv": _p("mamba_d_conv"), "expand": _p("mamba_expand"),
            "dt_rank": _p("mamba_dt_rank"), "conv_bias": _p("mamba_conv_bias"), "proj_bias": _p("mamba_proj_bias"),
            "attn_period": _p("attn_layer_period"), "attn_offset": _p("attn_layer_offset"),
            "experts": _p("num_experts"), "top_k": _p("num_experts_per_tok"),
            "expert_period": _p("expert_layer_period"), "expert_offset": _p("expert_layer_offset"),
            "tie_head": _TIED_HEAD,
        },
        requires={"hidden_act": ("silu",)},
        writes={"attention_dropout": 0.0},
        modules=(
            ("tok", "model.embed_tokens", "default"),
            ("trunk.{i}.n1", "model.layers.{i}.input_layernorm", "default"),
            ("trunk.{i}.mamba", "model.layers.{i}.mamba", "default"),
            ("trunk.{i}.attn", "model.layers.{i}.self_attn", "default"),
            ("trunk.{i}.n2", "model.layers.{i}.pre_ff_layernorm", "default"),
            ("trunk.{i}.ffn", "model.layers.{i}.feed_forward", "default"),
            ("trunk.{i}.moe", "model.layers.{i}.feed_forward", "jamba"),
            ("norm", "model.final_layernorm", "default"),
            ("head", "lm_head", "default"),
        ),
    ),
    "bamba": Family(
        model_type="bamba",
        architecture="BambaForCausalLM",
        blueprint="bamba.yaml",
        params={
            "vocab": _p("vocab_size"), "dim": _p("hidden_size"), "layers": _p("num_hidden_layers"),
            "attn_layers": _p("attn_layer_indices", default=[]),  # null: no attention layer
            "heads": _p("num_attention_heads"), "kv_heads": _p("num_key_value_heads", default="heads"),
            "hidden": _p("intermediate_size"), "eps": _p("rms_norm_eps"), "context": _p("max_position_embeddings"),
            "rope_base": _p("rope_parameters.rope_theta"), "rotary_factor": _p("rope_parameters.partial_rotary_factor"),
            "attn_bias": _p("attention_bias"), "mlp_bias": _p("mlp_bias"),
            "d_state": _p("mamba_d_state"), "expand": _p("mamba_expand"), "ssm_head_dim": _p("mamba_d_head"),
            "groups": _p("mamba_n_groups"), "conv": _p("mamba_d_conv"), "chunk": _p("mamba_chunk_size"),
            "conv_bias": _p("mamba_conv_bias"), "proj_bias": _p("mamba_proj_bias"),
            "tie_head": _TIED_HEAD, **_ROPE_SCALING,
        },
        requires={"hidden_act": ("silu",), **_ROPE_SCALING_REQUIRES,
                  "time_step_limit": ((0.0, float("inf")),)},
        writes={"mamba_n_heads": "${expand * dim // ssm_head_dim}", "attention_dropout": 0.0},
        modules=(
            ("tok", "model.embed_tokens", "default"),
            ("trunk.{i}.n1", "model.layers.{i}.input_layernorm", "default"),
            ("trunk.{i}.mamba", "model.layers.{i}.mamba", "default"),
            ("trunk.{i}.attn", "model.layers.{i}.self_attn", "default"),
            ("trunk.{i}.n2", "model.layers.{i}.pre_ff_layernorm", "default"),
            ("trunk.{i}.ffn", "model.layers.{i}.feed_forward", "default"),
            ("norm", "model.final_layernorm", "default"),
            ("head", "lm_head", "default"),
        ),
    ),
}


_MISSING = object()


def get_key(config: dict[str, Any], key: str) -> Any:
    """``config[a][b]`` for ``a.b``; ``_MISSING`` when absent."""
    cur: Any = config
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _set_key(config: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    cur = config
    for part in path:
        cur = cur.setdefault(part, {})
    cur[last] = value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def key_loc(config_file: Path | None, key: str) -> Loc | None:
    """Where the first part of ``key`` is written in ``config.json`` (line and column), if known."""
    if config_file is None:
        return None
    try:
        text = config_file.read_text(encoding="utf-8")
    except OSError:
        return Loc(file=str(config_file))
    first = key.split(".")[0]
    for name in (first, *_OLDER.get(first, ())):
        for n, line in enumerate(text.splitlines(), start=1):
            col = line.find(f'"{name}"')
            if col >= 0:
                return Loc(str(config_file), n, col + 1)
    return Loc(file=str(config_file))


# keys transformers reads under an older name (and converts): where config.json may spell them
_OLDER = {"rope_parameters": ("rope_scaling", "rope_theta")}


def missing_features(fam: Family, config: dict[str, Any], config_file: Path | None = None) -> list[tuple[str, Loc | None]]:
    """Each config value the family's graph cannot express: (message, where in config.json)."""
    out = []
    for key, allowed in fam.requires.items():
        # a matcher that reads other keys (WindowLayers) becomes the one value it allows here
        allowed = tuple(a.bound(config) if isinstance(a, Matcher) else a for a in allowed)
        raw = get_key(config, key)
        got = tuple(raw) if isinstance(raw, list) else raw  # a config list against a tuple requirement
        as_tuples = tuple(tuple(a) if isinstance(a, list) else a for a in allowed)  # and a list requirement
        if got is _MISSING or raw in allowed or got in as_tuples or (got == {} and None in allowed):
            continue
        parts = key.split(".")
        shown = f"{parts[0]}: " + "".join("{" + f"{p}: " for p in parts[1:]) + _show(got) + "}" * (len(parts) - 1)
        out.append((f"{shown} is not supported yet ({fam.model_type} imports need "
                    f"{key}: {' or '.join(_show(a) for a in allowed)})", key_loc(config_file, key)))
    for name, p in fam.params.items():
        got = get_key(config, p.key)
        if p.values and got is not _MISSING and got not in p.values:
            out.append((f"{p.key}: {_show(got)} is not supported yet (supported: {', '.join(map(str, p.values))})",
                        key_loc(config_file, p.key)))
    return out


def params_from_config(fam: Family, config: dict[str, Any], config_file: Path | None = None) -> dict[str, Any]:
    """The blueprint params of a transformers config (missing features must be checked first)."""
    params: dict[str, Any] = {}
    for name, p in fam.params.items():
        got = get_key(config, p.key)
        if got is _MISSING or (got is None and not p.nullable):
            if p.optional:
                params[name] = None
                continue
            if p.default is None:
                raise HFError(f"config.json has no {p.key}", loc=key_loc(config_file, p.key),
                              fix=f"add {p.key} (a {fam.model_type} config needs it)")
            got = evaluate(p.default, params) if isinstance(p.default, str) else p.default
        params[name] = p.values.get(got, got) if p.values else got
    return params


def config_from_params(fam: Family, params: dict[str, Any]) -> dict[str, Any]:
    """The transformers config (as a dict of keyword arguments) of a family blueprint's params."""
    config: dict[str, Any] = {"architectures": [fam.architecture]}
    for key, allowed in fam.requires.items():
        if allowed[0] is not None and not isinstance(allowed[0], Matcher):
            _set_key(config, key, allowed[0])
    for key, value in fam.writes.items():
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            value = evaluate(value[2:-1], params)
        _set_key(config, key, value)
    for name, p in fam.params.items():
        value = params[name]
        if value is None and p.optional and not p.nullable and None not in p.values.values():
            continue  # left out: transformers' default (a nullable param, or a value map that spells null, writes it)
        if p.values:
            value = next(k for k, v in p.values.items() if v == value)
        _set_key(config, p.key, value)
    return config


def family_blueprint(fam: Family, params: dict[str, Any], *, name: str, about: str) -> dict[str, Any]:
    """The family's blueprint document with ``params`` in place of its defaults."""
    import yaml

    path = FAMILY_DIR / fam.blueprint
    if not path.is_file():
        raise HFError(f"the {fam.model_type} family blueprint is missing", loc=Loc(file=str(path)),
                      fix="reinstall physlm-graph (the wheel ships blueprints/families/ as physlm_graph/families/)")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["name"], doc["about"] = name, about
    doc["params"] = {**doc["params"], **params}
    return doc


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(r"\{i\}", r"(\d+)") + "$")


@dataclass(frozen=True)
class Mapped:
    """One of our parameters and the transformers tensors it is made of."""

    ours: str  # full path in our state dict
    theirs: tuple[str, ...]  # full transformers keys (stacked: slice 0's parts, then slice 1's, ...)
    sizes: tuple[int, ...]  # rows of each part (several theirs)
    transposed: bool
    stack: int = 0  # ours is this many slices along a new dim 0 (experts), 0: not stacked
    layout: str = ""  # how theirs orders ours' rows ("heads3": per head [q_h | k_h | v_h])
    heads: int = 0  # the module's num_heads, for heads3
    rows: tuple[int, int] = ()  # ours is these rows of its one tensor of theirs

    def ours_from(self, parts: list[Any]) -> Any:
        """Our tensor from theirs (in ``theirs`` order, as stored)."""
        import torch

        parts = [p.t() if self.transposed else p for p in parts]
        if self.rows:
            parts = [p[self.rows[0]:self.rows[1]] for p in parts]
        if self.stack:
            n = len(parts) // self.stack
            value = torch.stack([_cat(parts[e * n:(e + 1) * n]) for e in range(self.stack)])
        else:
            value = _cat(parts)
        if self.layout == "heads3":  # (H, 3, hd, ...) rows -> (3, H, hd, ...)
            rest = value.shape[1:]
            value = value.reshape(self.heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)
        return value

    def theirs_from(self, value: Any) -> list[Any]:
        """Theirs (in ``theirs`` order) from our tensor."""
        if self.layout == "heads3":
            rest = value.shape[1:]
            value = value.reshape(3, self.heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)
        slices = list(value) if self.stack else [value]
        parts = []
        for piece in slices:
            parts.extend(piece.split(list(self.sizes), dim=0) if len(self.sizes) > 1 else [piece])
        if len(parts) != len(self.theirs):
            raise HFError(f"{self.ours} splits into {len(parts)} parts, not {len(self.theirs)}", node=self.ours)
        return [p.t() if self.transposed else p for p in parts]


def _cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def weight_map(fam: Family, cm: Any, module: Any) -> list[Mapped]:
    """Every parameter of ``module`` (a compiled family blueprint) with its transformers names,
    from the components' declarations. Tied aliases (the head sharing the embedding) are left out."""
    from physlm_graph._expr import ExprError
    from physlm_graph._registry import REGISTRY

    state = dict(module.named_parameters())  # tied parameters once, under their first name
    out: list[Mapped] = []
    covered: set[str] = set()
    for prefix, hf_prefix, layout in fam.modules:
        pat = _pattern(prefix)
        for path, node in cm.graph["nodes"].items():
            m = pat.match(path)
            if not m:
                continue
            info = REGISTRY.get(node["use"])
            if isinstance(layout, tuple):  # declared by the family: a layout the component lacks
                names = layout
            else:
                names = info.hf_names(layout) if info is not None else None
            if names is None:
                raise HFError(f"component {node['use']} declares no transformers names for layout {layout!r}",
                              node=path, fix=f"add hf={{{layout!r}: (HFName(...), ...)}} to its register(...)")
            theirs_prefix = hf_prefix.replace("{i}", m.group(1)) if m.groups() else hf_prefix
            sub = module.get_submodule(path)
            attrs = {k: v for k, v in vars(sub).items() if isinstance(v, int) and not isinstance(v, bool)}
            for n in names:
                ours = f"{path}.{n.ours}"
                if ours not in state:
                    continue  # off in this configuration (a bias), or a tied alias
                try:
                    sizes = tuple(int(evaluate(s, attrs)) for s in n.sizes)
                    stack = int(evaluate(n.stack, attrs)) if n.stack else 0
                    rows = tuple(int(evaluate(r, {**attrs, "rows": state[ours].shape[0]})) for r in n.rows)
                except ExprError as err:
                    raise HFError(f"component {node['use']}: HFName sizes of {n.ours}: {err}", node=path) from None
                theirs = tuple(f"{theirs_prefix}.{t}" for t in n.theirs)
                if stack:
                    theirs = tuple(t.replace("{e}", str(e)) for e in range(stack) for t in theirs)
                heads = 0
                if n.layout == "heads3":
                    heads = attrs.get("num_heads", 0)
                    if not heads or attrs.get("num_kv_heads", heads) != heads:
                        raise HFError(f"{n.ours}: the heads3 layout needs as many key/value heads as query heads",
                                      node=path, fix="this family has no grouped-query attention")
                elif n.layout:
                    raise HFError(f"component {node['use']}: unknown HFName layout {n.layout!r} of {n.ours}", node=path)
                if rows and (len(n.theirs) != 1 or stack or n.layout):
                    raise HFError(f"component {node['use']}: HFName rows of {n.ours} need one tensor of theirs, "
                                  "neither stacked nor laid out", node=path)
                out.append(Mapped(ours, theirs, sizes, n.transposed, stack, n.layout, heads, rows))
                covered.add(ours)
    left = [k for k in state if k not in covered]
    if left:
        raise HFError(f"no transformers name for {', '.join(left)}",
                      fix=f"the {fam.model_type} family's modules or the components' hf= declarations miss them")
    return out
