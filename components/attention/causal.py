"""attention.causal: multi-head / grouped-query causal self-attention (GPT-2, LLaMA), with a KV cache."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentError, ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._registry import HFName
from physlm_graph.components._rope import apply_rope
from physlm_graph.components._static_cache import static_cache

# SDPA learned to repeat key/value heads itself (enable_gqa) in torch 2.5.
_HAS_ENABLE_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class CausalSelfAttention(nn.Module):
    """Causal self-attention (Vaswani et al. 2017; GPT-2; grouped-query: Ainslie et al. 2023).

    ``q, k, v = split(qkv(x))`` with H query heads and H_kv key/value heads of width hd; with a
    rope table, q and k are rotated (``apply_rope``); each group of H / H_kv query heads shares
    one key/value head; ``y = softmax(q k^T / sqrt(hd) + causal mask) v``; ``out = proj(y)``.
    H_kv = H is multi-head attention (GPT-2), H_kv < H grouped-query (LLaMA 2 70B, LLaMA 3).

    ``qk_norm="rms"``: q and k are RMS-normalised over each head's hd channels before the rotary
    embedding, without learned weights, ``q / sqrt(mean(q^2) + eps)`` computed in float32 with eps
    float32's machine epsilon (``F.rms_norm``'s defaults; modded-nanogpt). ``scale`` replaces the softmax's
    ``1 / sqrt(hd)`` (modded-nanogpt: 0.12 on unit-RMS q and k).

    Shapes: x (B, T, D), rope (1, T, 3, hd) or None -> (B, T, D). ``qkv`` is one fused Linear
    D -> (H + 2 H_kv) hd laid out [q | k | v], heads contiguous inside each (as GPT-2's
    ``c_attn``); ``proj`` is H hd -> D. ``dropout`` applies to the attention weights and to
    the output, in training only.

    Incremental decoding: inside ``physlm_graph.decoding()``, keys and values of every chunk
    are appended to a cache kept in the decode context; the chunk's queries attend to all
    cached keys, the causal mask shifted by the cached length. With the decode engine's
    preallocated buffers (``components/_static_cache.py``) they are written in place at each
    row's positions and a length mask from those positions replaces the shifted one.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        bias: bool = True,
        scale: float | None = None,
        qk_norm: Literal["none", "rms"] = "none",
        proj_bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.scale = scale
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias if proj_bias is None else proj_bias)
        self.resid_drop = nn.Dropout(dropout)

    def norm_qk(self, t: Tensor) -> Tensor:
        """q or k (B, H, T, hd) after ``qk_norm``: RMS-normalised per head, or as they are."""
        return F.rms_norm(t, (self.head_dim,)) if self.qk_norm == "rms" else t

    def _extend_cache(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this chunk's keys/values to the decode cache (if decoding); return all of them."""
        ctx = decode_context()
        if ctx is None:
            return k, v
        static = static_cache(ctx)
        if static is not None:  # preallocated buffers, written in place (components/_static_cache.py)
            return static.write_kv(self, k, v)  # (B, H_kv, max_len, hd)
        past = ctx.get(self)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H_kv, S, hd)
            v = torch.cat([past[1], v], dim=2)
        ctx.set(self, (k, v))
        return k, v

    @staticmethod
    def _static_mask() -> Tensor | None:
        """With preallocated buffers, which keys each query sees (B, 1, T, max_len): the
        buffers' tails are stale, so the mask comes from the positions, not from S - T."""
        static = static_cache()
        return static.mask if static is not None else None

    @staticmethod
    def truncate_decode_state(state: tuple[Tensor, Tensor], length: int) -> tuple[Tensor, Tensor]:
        """The decode cache cut back to its first ``length`` positions (speculative decoding
        drops the rows of rejected draft tokens this way)."""
        k, v = state
        return k[:, :, :length], v[:, :, :length]

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        q, k = self.norm_qk(q), self.norm_qk(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v = self._extend_cache(k, v)  # (B, H_kv, S, hd), S = cached + T
        S = k.shape[2]

        # Query i of the chunk sits at absolute position S - T + i and sees keys 0 .. S - T + i.
        mask, is_causal = None, True
        if S != T:
            is_causal = False
            if T > 1:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
        if (static_mask := self._static_mask()) is not None:
            mask, is_causal = static_mask, False
        kw = {}
        if H != Hkv:
            if _HAS_ENABLE_GQA:
                kw["enable_gqa"] = True
            else:
                k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, hd)
                v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale, **kw
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H hd)
        return self.resid_drop(self.proj(y))  # (B, T, D)

    def extra_repr(self) -> str:
        extra = (f", scale={self.scale}" if self.scale is not None else "") + (
            f", qk_norm={self.qk_norm!r}" if self.qk_norm != "none" else "")
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dropout={self.dropout}{extra}"


class CausalAttentionParams(ComponentParams):
    num_heads: int = Field(gt=0, description="number of query heads")
    num_kv_heads: int | None = Field(
        None, gt=0, description="number of key/value heads, dividing num_heads (None: num_heads, i.e. MHA)"
    )
    head_dim: int | None = Field(None, gt=0, description="per-head width (None: input width // num_heads)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention weights and on the output, training only")
    bias: bool = Field(True, description="biases on the qkv and output projections (GPT-2: yes, LLaMA: no)")
    scale: float | None = Field(None, gt=0.0, description="the softmax's scale on q k^T (None: 1 / sqrt(head_dim); "
                                                           "modded-nanogpt: 0.12)")
    qk_norm: Literal["none", "rms"] = Field(
        "none", description="rms: q and k RMS-normalised per head, no learned weights, before the rotary embedding "
                            "(modded-nanogpt)")
    proj_bias: bool | None = Field(None, description="bias on the output projection (None: as bias; Qwen2: "
                                   "bias true, proj_bias false)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


_QKV = ("num_heads * head_dim", "num_kv_heads * head_dim", "num_kv_heads * head_dim")
# transformers' names: LLaMA-style separate q/k/v/o projections; GPT-2's fused c_attn as a (in, out) Conv1D
_HF = {
    "default": (HFName("qkv.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), _QKV),
                HFName("qkv.bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias"), _QKV),
                HFName("proj.weight", ("o_proj.weight",)), HFName("proj.bias", ("o_proj.bias",))),
    "conv1d": (HFName("qkv.weight", ("c_attn.weight",), transposed=True), HFName("qkv.bias", ("c_attn.bias",)),
               HFName("proj.weight", ("c_proj.weight",), transposed=True), HFName("proj.bias", ("c_proj.bias",))),
}


@register(
    "attention.causal",
    params=CausalAttentionParams,
    hf=_HF,
    inputs=("x", "rope"),
    optional_inputs=("rope",),
    decode="cached",
    examples=[
        Example({"num_heads": 4}, {"x": (2, 8, 32)}),
        Example({"num_heads": 4, "num_kv_heads": 2, "bias": False}, {"x": (2, 8, 32)}),
        Example({"num_heads": 4, "num_kv_heads": 2, "proj_bias": False}, {"x": (2, 8, 32)}),
        # With a rope input. The suite feeds random inputs; an integer table drawn from
        # [0, head_dim) keeps its partner-index channel a valid index.
        Example(
            {"num_heads": 4, "num_kv_heads": 1, "head_dim": 6, "bias": False},
            {"x": (2, 8, 32), "rope": ((1, 8, 3, 6), torch.long)},
            int_high=6,
        ),
        Example(
            {"num_heads": 2, "head_dim": 8, "scale": 0.12, "qk_norm": "rms"},
            {"x": (2, 8, 32), "rope": ((1, 8, 3, 8), torch.long)},
            int_high=8,
        ),
    ],
)
def build_causal_attention(p: CausalAttentionParams, ins: Inputs) -> CausalSelfAttention:
    width = ins["x"].dim
    if p.head_dim is None and width % p.num_heads:
        raise ComponentError(
            f"num_heads ({p.num_heads}) must divide the input width {width}",
            param="num_heads",
            expected=f"a divisor of the width {width}",
            got=str(p.num_heads),
            fix=f"use one of {_divisors(width)}, or set head_dim",
        )
    num_kv_heads = p.num_kv_heads if p.num_kv_heads is not None else p.num_heads
    if p.num_heads % num_kv_heads:
        raise ComponentError(
            f"num_kv_heads ({num_kv_heads}) must divide num_heads ({p.num_heads})",
            param="num_kv_heads",
            expected=f"a divisor of num_heads {p.num_heads}",
            got=str(num_kv_heads),
            fix=f"use one of {_divisors(p.num_heads)}",
        )
    head_dim = p.head_dim if p.head_dim is not None else width // p.num_heads
    rope = ins.get("rope")
    if rope is not None and rope.dim != head_dim:
        raise ComponentError(
            f"the rope table is for head_dim {rope.dim} but the attention's head_dim is {head_dim}",
            param=None,
            expected=str(head_dim),
            got=str(rope.dim),
            fix=f"give embed.rope head_dim: {head_dim}",
        )
    return CausalSelfAttention(
        embed_dim=width, num_heads=p.num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dropout=p.dropout, bias=p.bias,
        scale=p.scale, qk_norm=p.qk_norm, proj_bias=p.proj_bias,
    )
