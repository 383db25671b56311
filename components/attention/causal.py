"""attention.causal: multi-head / grouped-query causal self-attention (GPT-2, LLaMA, Mistral, Gemma 2), with a KV cache."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentError, ComponentParams, Example, Inputs, PhysLMError, decode_context, register
from physlm_graph._registry import HFName
from physlm_graph.components._rope import apply_rope, rope_table
from physlm_graph.components._static_cache import static_cache
from physlm_graph.components.norm.rms import RMSNorm

# SDPA learned to repeat key/value heads itself (enable_gqa) in torch 2.5.
_HAS_ENABLE_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class CausalSelfAttention(nn.Module):
    """Causal self-attention (Vaswani et al. 2017; GPT-2; grouped-query: Ainslie et al. 2023).

    ``q, k, v = split(qkv(x))`` with H query heads and H_kv key/value heads of width hd; with a
    rope table, q and k are rotated (``apply_rope``); each group of H / H_kv query heads shares
    one key/value head; ``y = softmax(q k^T / sqrt(hd) + causal mask) v``; ``out = proj(y)``.
    H_kv = H is multi-head attention (GPT-2), H_kv < H grouped-query (LLaMA 2 70B, LLaMA 3).

    ``qk_norm`` RMS-normalises q and k before the rotary embedding:

    - ``rms``: over each head's hd channels, without learned weights, ``q / sqrt(mean(q^2) + eps)``
      in float32, eps float32's machine epsilon unless ``qk_norm_eps`` is set (modded-nanogpt);
    - ``rms_head``: over each head's hd channels with a learned weight of hd shared by all heads,
      one for q and one for k (``q_norm``, ``k_norm``; Qwen3);
    - ``rms_proj``: over the whole query projection (H hd channels) and the whole key projection
      (H_kv hd), each with its own learned weight of that width, before the split into heads (OLMo 2).

    The learned forms are ``norm.rms`` (eps ``qk_norm_eps``, default 1e-6; with
    ``qk_norm_unit_offset`` its ``1 + w`` form, as Gemma 3's per-head norms). ``scale`` replaces the
    softmax's ``1 / sqrt(hd)`` (modded-nanogpt: 0.12 on unit-RMS q and k; Gemma 2:
    ``query_pre_attn_scalar ** -0.5``).

    ``sliding_window`` W: query i sees keys i - W + 1 .. i only, itself and the W - 1 positions
    before it (Mistral; Gemma 2 in every other layer; Beltagy et al. 2020). ``softcap`` c: each
    score ``s = scale q k^T`` becomes ``c tanh(s / c)`` before the mask and the softmax (Gemma 2:
    50); the softmax then runs in float32 and the attention is computed without SDPA, which has
    no hook for it.

    Shapes: x (B, T, D), rope (1, T, 3, hd) or None -> (B, T, D). ``qkv`` is one fused Linear
    D -> (H + 2 H_kv) hd laid out [q | k | v], heads contiguous inside each (as GPT-2's
    ``c_attn``); ``proj`` is H hd -> D. ``dropout`` applies to the attention weights and to
    the output, in training only.

    Incremental decoding: inside ``physlm_graph.decoding()``, keys and values of every chunk
    are appended to a cache kept in the decode context; the chunk's queries attend to all
    cached keys, the causal mask shifted by the cached length. With a sliding window the cache
    keeps only the last W - 1 positions (the most any later query can see) plus ``REWIND``
    more, so that speculative decoding can cut up to ``REWIND`` rejected draft rows back. With the
    decode engine's preallocated buffers (``components/_static_cache.py``) keys and values are
    written in place at each row's positions, and a length mask from those positions (and the
    window) replaces the shifted one.
    """

    REWIND = 32  # positions a windowed cache keeps beyond the window, for truncate_decode_state

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
        qk_norm: Literal["none", "rms", "rms_head", "rms_proj"] = "none",
        qk_norm_eps: float | None = None,
        qk_norm_unit_offset: bool = False,
        proj_bias: bool | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.scale = scale
        self.qk_norm = qk_norm
        self.qk_norm_eps = qk_norm_eps
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        if qk_norm in ("rms_head", "rms_proj"):
            eps = 1e-6 if qk_norm_eps is None else qk_norm_eps
            q_width, k_width = (head_dim, head_dim) if qk_norm == "rms_head" else (num_heads * head_dim,
                                                                                 num_kv_heads * head_dim)
            self.q_norm = RMSNorm(embed_dim=q_width, eps=eps, unit_offset=qk_norm_unit_offset)
            self.k_norm = RMSNorm(embed_dim=k_width, eps=eps, unit_offset=qk_norm_unit_offset)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias if proj_bias is None else proj_bias)
        self.resid_drop = nn.Dropout(dropout)

    def norm_qk(self, t: Tensor, role: Literal["q", "k"]) -> Tensor:
        """q (``role="q"``) or k (B, heads, T, hd) after ``qk_norm``, or as they are."""
        if self.qk_norm == "none":
            return t
        if self.qk_norm == "rms":
            return F.rms_norm(t, (self.head_dim,), eps=self.qk_norm_eps)
        norm = self.q_norm if role == "q" else self.k_norm
        if self.qk_norm == "rms_head":
            return norm(t)
        B, h, T, hd = t.shape  # rms_proj: the heads side by side, as the projection wrote them
        flat = norm(t.transpose(1, 2).reshape(B, T, h * hd))  # (B, T, h hd)
        return flat.view(B, T, h, hd).transpose(1, 2)

    def _extend_cache(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this chunk's keys/values to the decode cache (if decoding); return all the
        cached ones and this chunk's. A windowed cache then forgets what no later query sees."""
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
        if self.sliding_window is None:
            ctx.set(self, (k, v))
            return k, v
        start = 0 if past is None else past[2]  # absolute position of the first cached row
        drop = max(k.shape[2] - (self.sliding_window - 1 + self.REWIND), 0)
        ctx.set(self, (k[:, :, drop:], v[:, :, drop:], start + drop))
        return k, v

    def truncate_decode_state(self, state: tuple, length: int) -> tuple:
        """The decode cache cut back to its first ``length`` positions (speculative decoding
        drops the rows of rejected draft tokens this way)."""
        if len(state) == 2:
            k, v = state
            return k[:, :, :length], v[:, :, :length]
        k, v, start = state
        keep = length - start
        if start > 0 and keep < self.sliding_window - 1:
            raise PhysLMError(
                f"a sliding-window cache cannot go back to position {length}: it kept positions {start} to "
                f"{start + k.shape[2] - 1} and the window needs the {self.sliding_window - 1} before the next",
                fix=f"draft at most {self.REWIND} tokens ahead (the rows a windowed cache keeps to rewind)")
        return k[:, :, :keep], v[:, :, :keep], start

    def _mask(self, T: int, S: int, device: torch.device, explicit: bool) -> tuple[Tensor | None, bool]:
        """(mask, is_causal) for T queries over S keys: query i sits at absolute position S - T + i.
        The mask is (T, S) bool, True where the key is seen; ``explicit`` always builds it."""
        W = self.sliding_window
        if W is not None and W >= S:
            W = None  # every key is inside the window: plain causal (SDPA keeps its mask-free kernels)
        if W is None and not explicit:
            if S == T:
                return None, True
            if T == 1:
                return None, False  # one query after the cache: it sees every key
        qpos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
        kpos = torch.arange(S, device=device)[None, :]  # (1, S)
        seen = kpos <= qpos
        if W is not None:
            seen = seen & (kpos > qpos - W)  # the key is one of the W latest positions
        return seen, False  # (T, S)

    def _attend_math(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """softmax(mask(scale q k^T)) v written out, the softmax in float32; with ``softcap`` c the
        scores are c tanh(s / c) first (Gemma 2's order). Grouped heads attend through a reshape
        (each group of H / H_kv query heads against its key/value head), not copies of k and v.
        ``mask`` (T, S) or (B, 1, T, S) bool, True where the key is seen."""
        B, H, T, hd = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        g = H // Hkv
        scale = self.scale if self.scale is not None else hd**-0.5
        s = torch.matmul(q.reshape(B, Hkv, g * T, hd), k.transpose(-2, -1)) * scale  # (B, H_kv, g T, S)
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        s = s.view(B, Hkv, g, T, S).masked_fill(~mask.unsqueeze(-3), float("-inf"))
        w = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=self.dropout, training=self.training)
        return torch.matmul(w.view(B, Hkv, g * T, S), v).view(B, H, T, v.shape[-1])  # (B, H, T, hd)

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        q, k = self.norm_qk(q, "q"), self.norm_qk(k, "k")
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v = self._extend_cache(k, v)  # (B, H_kv, S, hd), S = cached + T
        S = k.shape[2]

        # Query i of the chunk sits at absolute position S - T + i and sees keys 0 .. S - T + i
        # (with a window, only the last sliding_window of them). With the decode engine's
        # preallocated buffers the positions come from the static cache instead (stale tails hidden).
        static = static_cache()
        if static is not None:
            mask, is_causal = static.window_mask(self.sliding_window), False  # (B, 1, T, max_len)
        else:
            mask, is_causal = self._mask(T, S, x.device, explicit=self.softcap is not None)
        if self.softcap is not None or (static is not None and static.attention == "math"):
            y = self._attend_math(q, k, v, mask)  # (B, H, T, hd)
        else:
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
        extra = "".join(f", {k}={getattr(self, k)!r}" for k, off in
                        (("scale", None), ("qk_norm", "none"), ("qk_norm_eps", None), ("sliding_window", None),
                         ("softcap", None)) if getattr(self, k) != off)
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
    qk_norm: Literal["none", "rms", "rms_head", "rms_proj"] = Field(
        "none", description="RMS-normalise q and k before the rotary embedding: rms per head without weights "
                            "(modded-nanogpt); rms_head per head with learned weights (Qwen3); rms_proj over the "
                            "whole q and k projections with learned weights (OLMo 2)")
    qk_norm_eps: float | None = Field(None, gt=0.0, description="eps of qk_norm (None: float32's machine epsilon "
                                      "for rms, 1e-6 for the learned forms; Qwen3, OLMo 2: the model's rms eps)")
    qk_norm_unit_offset: bool = Field(False, description="the learned qk_norm weights scale by 1 + w, starting at 0 "
                                      "(norm.rms's unit_offset; Gemma 3)")
    proj_bias: bool | None = Field(None, description="bias on the output projection (None: as bias; Qwen2: "
                                   "bias true, proj_bias false)")
    sliding_window: int | None = Field(None, gt=0, description="each query sees itself and the sliding_window - 1 "
                                       "positions before it (None: all before it; Mistral, Gemma 2: 4096)")
    softcap: float | None = Field(None, gt=0.0, description="soft-cap the attention scores to (-softcap, softcap) "
                                  "with softcap tanh(s / softcap) before the softmax (Gemma 2: 50)")

    @model_validator(mode="after")
    def _qk_norm_options_need_their_norm(self) -> CausalAttentionParams:
        wrong = []
        if self.qk_norm == "none" and self.qk_norm_eps is not None:
            wrong.append("qk_norm_eps is set but qk_norm is none: set qk_norm (rms, rms_head or rms_proj) "
                         "or drop qk_norm_eps")
        if self.qk_norm_unit_offset and self.qk_norm not in ("rms_head", "rms_proj"):
            wrong.append(f"qk_norm_unit_offset needs learned QK-norm weights, but qk_norm is {self.qk_norm}: "
                         "set qk_norm to rms_head or rms_proj, or drop qk_norm_unit_offset")
        if wrong:
            raise ValueError("; ".join(wrong))
        return self


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


_QKV = ("num_heads * head_dim", "num_kv_heads * head_dim", "num_kv_heads * head_dim")
# transformers' names: LLaMA-style separate q/k/v/o projections; GPT-2's fused c_attn as a (in, out) Conv1D
_HF = {
    "default": (HFName("qkv.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), _QKV),
                HFName("qkv.bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias"), _QKV),
                HFName("proj.weight", ("o_proj.weight",)), HFName("proj.bias", ("o_proj.bias",)),
                HFName("q_norm.weight", ("q_norm.weight",)), HFName("k_norm.weight", ("k_norm.weight",))),
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
        # With a rope input: a real table (its partner row is a permutation of the channels).
        Example(
            {"num_heads": 4, "num_kv_heads": 1, "head_dim": 6, "bias": False},
            {"x": (2, 8, 32), "rope": rope_table(0, 8, head_dim=6, base=10000.0, style="half")},
        ),
        Example(
            {"num_heads": 2, "head_dim": 8, "scale": 0.12, "qk_norm": "rms"},
            {"x": (2, 8, 32), "rope": rope_table(0, 8, head_dim=8, base=1024.0, style="half",
                                                 frequencies="truncated", sign=-1)},
        ),
        Example({"num_heads": 4, "num_kv_heads": 2, "qk_norm": "rms_head", "qk_norm_eps": 1e-5}, {"x": (2, 8, 32)}),
        Example({"num_heads": 4, "num_kv_heads": 2, "qk_norm": "rms_proj"}, {"x": (2, 8, 32)}),
        Example({"num_heads": 4, "qk_norm": "rms_head", "qk_norm_unit_offset": True}, {"x": (2, 8, 32)}),
        Example({"num_heads": 4, "num_kv_heads": 2, "sliding_window": 3}, {"x": (2, 10, 32)}),
        Example({"num_heads": 4, "num_kv_heads": 2, "sliding_window": 4, "softcap": 5.0, "scale": 0.3},
                {"x": (2, 10, 32)}),
        Example({"num_heads": 2, "softcap": 2.0, "dropout": 0.1}, {"x": (2, 8, 32)}),
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
        scale=p.scale, qk_norm=p.qk_norm, qk_norm_eps=p.qk_norm_eps, qk_norm_unit_offset=p.qk_norm_unit_offset,
        proj_bias=p.proj_bias,
        sliding_window=p.sliding_window, softcap=p.softcap,
    )
