"""attention.dendritic: Brain-Inspired GPT V1's DendriticAttention (comsa33/brain-inspired-gpt @ 2beb863)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._errors import ComponentError
from physlm_graph.components._decode_cache import AppendCache


class DendriticAttention(nn.Module):
    """Causal multi-head attention whose heads are split into G "dendrite" groups, with gating.

    Reproduces ``DendriticAttention`` of Brain-Inspired GPT V1 (``brain_gpt/core/model_brain.py``
    at ``2beb863``; SEEDS.md §3.1). G = min(n_dendrites, H) groups of H/G heads of width
    d = D/H; group g has its own bias-free projection W_g: D -> 3 (H/G) d giving its q, k, v.
    The group outputs are concatenated (heads in group order) and mixed by W_soma (D x D, no
    bias). Attention is causal SDPA with scale 1/sqrt(d) and no dropout.

    ``mode="faithful"`` (the published code):
        g_t = sigmoid(w_2 gelu(W_1 x_t)) (D -> D/8 -> 1, no biases), M_t = 1[g_t > threshold],
        out = M * W_soma(concat_g causal_attn(W_g (M * x))).
      - **untrainable gate:** M is a hard threshold, so W_1 and w_2 never get a gradient. At
        init g is about 0.4-0.6, so M = 1 everywhere and the layer is standard causal MHA.
      - masked tokens keep k = v = 0 and still take softmax mass (score 0); they are not
        excluded from other tokens' attention.

    ``mode="fixed"`` (default; the README's "per-dendrite gating, weighted sum", which the
    code never implemented): one soft gate per dendrite and token,
        w_{t,g} = max(0, sigmoid(w_2 gelu(W_1 x_t))_g - threshold) / (1 - threshold)  in [0, 1]
    (D -> D/8 -> G, no biases), and out = W_soma(concat_g(w_g * attn_g(x))), i.e. a weighted
    sum over dendrites of each one's contribution through its slice of W_soma. A dendrite below
    the threshold is switched off for that token, as in the original, but above it the gate is
    differentiable and learns. The keys and values are not gated. Default because the faithful
    gate never trains (it is a no-op at init), so fixed is the first version that does anything.

    Shapes: x (B, T, D) -> (B, T, D). Both modes are causal.

    Incremental decoding (both modes): the gates are per token, so inside
    ``physlm_graph.decoding()`` each group's keys and values are appended to a cache kept in the
    decode context and the chunk's queries attend to all of them.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        n_dendrites: int = 8,
        dendrite_threshold: float = 0.3,
        mode: Literal["faithful", "fixed"] = "fixed",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.groups = min(n_dendrites, num_heads)
        self.threshold = dendrite_threshold
        self.mode = mode
        hpg = num_heads // self.groups  # heads per dendrite
        # The G per-dendrite projections, stacked so that one einsum runs them all.
        bound = 1.0 / math.sqrt(embed_dim)  # nn.Linear's default init
        self.qkv_weight = nn.Parameter(torch.empty(self.groups, 3 * hpg * self.head_dim, embed_dim).uniform_(-bound, bound))
        self.soma = nn.Linear(embed_dim, embed_dim, bias=False)
        self.gate_fc = nn.Linear(embed_dim, embed_dim // 8, bias=False)
        self.gate_out = nn.Linear(embed_dim // 8, 1 if mode == "faithful" else self.groups, bias=False)

    def _attend(self, x: Tensor) -> Tensor:
        """Per-dendrite causal attention; returns (B, T, G, (H/G) d), heads in group order."""
        B, T, D = x.shape
        G = self.groups
        hpg = self.num_heads // G
        qkv = torch.einsum("btd,god->btgo", x, self.qkv_weight)  # (B, T, G, 3 hpg d)
        qkv = qkv.view(B, T, G, 3, hpg, self.head_dim)
        q, k, v = (qkv[:, :, :, i].reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2) for i in range(3))
        k, v = _extend_kv(self, k, v)  # (B, H, S, d), S = cached + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_chunk_mask(T, k.shape[2], x.device),
                                           is_causal=k.shape[2] == T)  # (B, H, T, d)
        return y.transpose(1, 2).reshape(B, T, G, hpg * self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        g = torch.sigmoid(self.gate_out(F.gelu(self.gate_fc(x))))  # (B, T, 1) or (B, T, G)
        if self.mode == "faithful":
            m = (g > self.threshold).to(x.dtype)  # (B, T, 1) hard: no gradient to the gate
            return self.soma(self._attend(m * x).reshape(B, T, D)) * m
        w = F.relu(g - self.threshold) / (1 - self.threshold)  # (B, T, G) soft, zero below threshold
        return self.soma((w.unsqueeze(-1) * self._attend(x)).reshape(B, T, D))


def _extend_kv(module: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Inside ``decoding()``: append this chunk's keys/values (B, H, T, d) to ``module``'s cache
    and return all of them; outside it, return them as they are."""
    ctx = decode_context()
    if ctx is None:
        return k, v
    cache = ctx.get(module)
    if cache is None:
        cache = AppendCache(2, 2)
        ctx.set(module, cache)
    return cache.extend(k, v)


def _chunk_mask(T: int, S: int, device: torch.device) -> Tensor | None:
    """The causal mask of a chunk of T queries at the end of S keys (None: plain causal, or one query)."""
    if S == T or T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)  # (T, S)


class DendriticParams(ComponentParams):
    num_heads: int = Field(gt=0, description="attention heads; must divide the width")
    n_dendrites: int = Field(
        8, gt=0, description="dendrite groups, capped at num_heads; min(n_dendrites, num_heads) must divide num_heads"
    )
    dendrite_threshold: float = Field(
        0.3, ge=0.0, lt=1.0, description="gate threshold: faithful hard mask 1[g > t]; fixed soft gate relu(g - t)/(1 - t)"
    )
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="faithful: one hard, untrainable token gate (published); fixed: a trainable soft gate per dendrite",
    )


@register(
    "attention.dendritic",
    params=DendriticParams,
    decode="cached",
    flags=("untrainable hard gate (faithful)",),
    examples=[
        Example(
            {"num_heads": 4, "n_dendrites": 2, "mode": "faithful"},
            {"x": (2, 8, 32)},
            no_grad=("gate_fc.*", "gate_out.*"),
            no_grad_why="the faithful gate is a hard threshold 1[g > 0.3]: no gradient reaches it (published bug)",
        ),
        Example({"num_heads": 4, "n_dendrites": 8}, {"x": (2, 12, 32)}),
        Example({"num_heads": 4, "n_dendrites": 2, "dendrite_threshold": 0.45}, {"x": (2, 16, 16)}),
    ],
)
def build_dendritic(p: DendriticParams, ins: Inputs) -> DendriticAttention:
    D = ins["x"].dim
    if D % p.num_heads:
        raise ComponentError(
            f"num_heads must divide the width {D}", param="num_heads", expected=f"a divisor of {D}", got=str(p.num_heads)
        )
    groups = min(p.n_dendrites, p.num_heads)
    if p.num_heads % groups:
        ok = [n for n in range(1, p.num_heads + 1) if p.num_heads % n == 0]
        raise ComponentError(
            f"min(n_dendrites, num_heads) = {groups} must divide num_heads = {p.num_heads}",
            param="n_dendrites",
            expected=f"a divisor of {p.num_heads} (or >= it)",
            got=str(p.n_dendrites),
            fix="use one of " + ", ".join(map(str, ok)),
        )
    if D < 8:
        raise ComponentError(
            f"the gate network has width D/8, so the width must be at least 8, got {D}",
            expected="width >= 8",
            got=str(D),
        )
    return DendriticAttention(embed_dim=D, **p.model_dump())
