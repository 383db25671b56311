"""attention.selective: Brain-Inspired GPT V2's SelectiveAttention (comsa33/brain-inspired-gpt @ 2beb863)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._errors import ComponentError
from physlm_graph.components._decode_cache import AppendCache


class SelectiveAttention(nn.Module):
    """Multi-head attention run only among the tokens an importance scorer selects.

    Reproduces ``SelectiveAttention`` of Brain-Inspired GPT V2 (``brain_gpt/core/model_brain_v2.py``
    at ``2beb863``; SEEDS.md §3.5). The importance of token t is s_t = sigmoid(w_2 relu(W_1 u_t
    + b_1) + b_2) (D -> D/4 -> 1, with biases); q, k, v = W_qkv u (no bias) in H heads of width
    d; W_o has no bias; w is a learned scalar initialised to 1.

    ``mode="faithful"`` (the published code; **leaks the future**):
        n = max(1, floor(select_fraction T)); P = the n positions with the largest s (over the
        whole sequence); o_P = W_o MHA(u_P) with *unmasked* softmax(q k^T / sqrt(d)) among the
        selected tokens; o = 0 elsewhere; returns u + w o.
      - **[LEAK]** the top-n selection compares a position's score with later positions', and a
        selected token attends to later selected tokens: bidirectional, under a next-token loss.
      - **untrained scorer:** only the indices of the top-n are used, so the importance MLP
        never gets a gradient.
      - **double residual:** the layer returns u + w o, so a block h + mixer(LN h) adds LN(h)
        to the residual stream on top of the usual skip.

    ``mode="fixed"`` (default; causal and trainable, the fix SEEDS.md §3.5 suggests): token t is
    selected iff s_t > ``threshold`` (a per-token decision, no comparison with other positions);
    a selected token attends causally to the selected tokens j <= t; the output is
    o_t = w 1[s_t > threshold] s_t W_o attn_t, so the scorer gets a gradient through s_t; not
    selected tokens get 0. No inner residual: wire the skip connection in the blueprint. The
    scorer's output bias starts at logit(threshold) + 1, so nearly every token is selected at
    init and the layer learns to drop tokens (one that selected none would get no gradient).
    Vectorised with a (B, 1, T, T) mask built from the selection (cost of dense attention).
    ``select_fraction`` is the faithful budget and has no role in fixed mode, so it is refused
    there if set; ``threshold`` likewise only in fixed mode.

    Shapes: u (B, T, D) -> (B, T, D).

    Incremental decoding: fixed mode keeps each token's key, value and selection bit in the
    decode context (a token's selection depends on it alone), so a chunk attends to the cached
    selected tokens exactly as the full forward does. Faithful mode cannot decode
    incrementally: its top-n is taken over the whole sequence, so a new token can change which
    earlier tokens are selected and every earlier output (the leak), and the full context is
    recomputed for each token.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        select_fraction: float = 0.1,
        threshold: float = 0.5,
        mode: Literal["faithful", "fixed"] = "fixed",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.select_fraction = select_fraction
        self.threshold = threshold
        self.mode = mode
        self.score_fc = nn.Linear(embed_dim, embed_dim // 4)
        self.score_out = nn.Linear(embed_dim // 4, 1)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.residual_weight = nn.Parameter(torch.ones(1))
        self.after_init_scheme()

    @torch.no_grad()
    def after_init_scheme(self) -> None:
        """The deliberate init, kept under a blueprint's ``init:`` scheme (``physlm_graph/_init.py``).
        Fixed mode starts with (nearly) every token selected: an unselected token sends no
        gradient to the scorer, so a layer that selected nothing at init would stay dead."""
        if self.mode == "fixed":
            nn.init.constant_(self.score_out.bias, math.log(self.threshold / (1 - self.threshold)) + 1.0)

    def importance(self, u: Tensor) -> Tensor:
        return torch.sigmoid(self.score_out(F.relu(self.score_fc(u)))).squeeze(-1)  # (B, T)

    def _heads(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = u.shape
        qkv = self.qkv(u).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # 3 x (B, H, T, d)

    def _extend_cache(self, k: Tensor, v: Tensor, sel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inside ``decoding()``: append this chunk's keys, values and selection to the cache."""
        ctx = decode_context()
        if ctx is None:
            return k, v, sel
        cache = ctx.get(self)
        if cache is None:
            cache = AppendCache(2, 2, 1)
            ctx.set(self, cache)
        return cache.extend(k, v, sel)

    def forward(self, u: Tensor) -> Tensor:
        return self._faithful(u) if self.mode == "faithful" else self._fixed(u)

    def _faithful(self, u: Tensor) -> Tensor:
        B, T, D = u.shape
        n = max(1, math.floor(T * self.select_fraction))
        idx = self.importance(u).topk(n, dim=1).indices  # (B, n) ranked by score, not by position
        idx = idx.unsqueeze(-1).expand(B, n, D)
        q, k, v = self._heads(torch.gather(u, 1, idx))  # (B, H, n, d) each
        y = F.scaled_dot_product_attention(q, k, v)  # unmasked among the selected: the leak
        o = self.proj(y.transpose(1, 2).reshape(B, n, D))  # (B, n, D)
        out = torch.zeros_like(u).scatter(1, idx, o)  # (B, T, D), zero where not selected
        return u + self.residual_weight * out

    def _fixed(self, u: Tensor) -> Tensor:
        B, T, D = u.shape
        s = self.importance(u)  # (B, T)
        sel = s > self.threshold  # (B, T), decided per token
        q, k, v = self._heads(u)
        k, v, sel_keys = self._extend_cache(k, v, sel)  # (B, H, S, d), (B, S); S = cached + T
        S = k.shape[2]
        qpos = torch.arange(S - T, S, device=u.device)[:, None]  # absolute positions of the queries
        kpos = torch.arange(S, device=u.device)[None, :]
        # query i may see key j <= i if j is selected; the diagonal keeps unselected rows finite
        allowed = (kpos <= qpos) & (sel_keys[:, None, :] | (kpos == qpos))  # (B, T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, H, T, d)
        o = self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        gate = torch.where(sel, s, torch.zeros_like(s)).unsqueeze(-1)  # (B, T, 1)
        return self.residual_weight * gate * o


class SelectiveParams(ComponentParams):
    num_heads: int = Field(gt=0, description="attention heads; must divide the width")
    select_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="faithful: tokens attended = max(1, floor(select_fraction * T)) (top-k)"
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="fixed: a token is selected iff its importance exceeds this")
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="faithful: global top-k and unmasked attention, leaks the future (published); "
        "fixed: per-token threshold, causal among the selected, trainable scorer",
    )

    @model_validator(mode="after")
    def _mode_knobs(self) -> SelectiveParams:
        if self.mode == "fixed" and "select_fraction" in self.model_fields_set:
            raise ValueError("select_fraction is the faithful top-k budget; fixed mode selects by threshold")
        if self.mode == "faithful" and "threshold" in self.model_fields_set:
            raise ValueError("threshold is used by fixed mode only; faithful selects the top select_fraction")
        return self


@register(
    "attention.selective",
    params=SelectiveParams,
    causal=lambda p: p.mode != "faithful",
    decode=lambda p: "cached" if p.mode == "fixed" else "none",
    flags=("leaks-future (faithful)", "untrained importance scorer (faithful)", "double residual (faithful)"),
    examples=[
        Example(
            {"num_heads": 2, "select_fraction": 0.5, "mode": "faithful"},
            {"x": (2, 16, 16)},
            no_grad=("score_fc.*", "score_out.*"),
            no_grad_why="faithful uses only the top-k indices of the importance scores: the scorer gets no gradient",
        ),
        Example({"num_heads": 4}, {"x": (2, 16, 32)}),
        Example({"num_heads": 2, "threshold": 0.45}, {"x": (2, 8, 16)}),
    ],
)
def build_selective(p: SelectiveParams, ins: Inputs) -> SelectiveAttention:
    D = ins["x"].dim
    if D % p.num_heads:
        raise ComponentError(
            f"num_heads must divide the width {D}", param="num_heads", expected=f"a divisor of {D}", got=str(p.num_heads)
        )
    if D < 4:
        raise ComponentError(f"the importance scorer has width D/4, so the width must be at least 4, got {D}")
    return SelectiveAttention(embed_dim=D, **p.model_dump())
