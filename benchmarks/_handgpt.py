"""An independent, hand-written GPT (nanoGPT's structure) that benchmarks compare against."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from physlm_graph.components.ffn._gelu_mlp import fused_dtype, gelu_mlp


class HandAttention(nn.Module):
    def __init__(self, d: int, h: int, bias: bool) -> None:
        super().__init__()
        self.h = h
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.h, C // self.h).transpose(1, 2)
        k = k.view(B, T, self.h, C // self.h).transpose(1, 2)
        v = v.view(B, T, self.h, C // self.h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class HandBlock(nn.Module):
    def __init__(self, d: int, h: int, bias: bool, gelu: str = "none", fused_mlp: bool = False) -> None:
        super().__init__()
        self.gelu, self.fused_mlp = gelu, fused_mlp
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.attn = HandAttention(d, h, bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.c_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        dtype = fused_dtype(h, self.c_fc.weight) if self.fused_mlp else None
        if dtype is not None:  # the GELU in cuBLASLt's epilogues, as physlm-graph's ffn.mlp does it
            return x + gelu_mlp(h, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias, dtype)
        return x + self.c_proj(F.gelu(self.c_fc(h), approximate=self.gelu))


class HandGPT(nn.Module):
    """nanoGPT's GPT written out by hand, independent of physlm-graph (no dropout).

    ``gelu``: "none" (exact, nanoGPT's) or "tanh" (GPT-2's); ``fused_mlp`` (tanh only): the MLP as
    physlm-graph's one-operation GELU MLP, so that both models get the same kernels.
    ``bf16_residual``: under autocast, the residual stream in the autocast dtype from the
    embedding on (as the blueprint's ``params.residual: autocast``; llm.c's numerics).
    """

    def __init__(self, vocab: int, ctx: int, d: int, h: int, layers: int, bias: bool = True,
                 gelu: str = "none", fused_mlp: bool = False, bf16_residual: bool = False) -> None:
        super().__init__()
        self.bf16_residual = bf16_residual
        if fused_mlp and gelu != "tanh":
            raise ValueError("HandGPT: the fused MLP has only the tanh GELU")
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(HandBlock(d, h, bias, gelu, fused_mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output, the head's input."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        if self.bf16_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(idx))
