"""embed.token: the token embedding table (GPT-2 ``wte``, LLaMA ``tok_embeddings``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from physlm_graph import ComponentParams, Example, Inputs, register
from physlm_graph._registry import HFName


class TokenEmbedding(nn.Module):
    """Token embedding: ``out[b, t] = weight[tokens[b, t]]``.

    Shapes: tokens (B, T) integer -> (B, T, embed_dim). ``weight`` is (vocab_size, embed_dim),
    initialised N(0, 0.02) as in GPT-2 / nanoGPT; it is the parameter ``tie:`` shares with
    ``head.lm`` (weight tying, Press & Wolf 2017).

    ``dtype`` is the table's storage dtype, and so its output's: ``bfloat16`` halves the table
    and its optimizer state (modded-nanogpt keeps its embedding in bf16). The values are drawn in
    float32 and then rounded, so a bf16 table is the rounded float32 one of the same seed. A
    blueprint that computes in float32 casts the lookup (``cast`` to float32, then to
    ``autocast`` for a bf16 stream under autocast: ``blueprints/speedrun-track3.yaml``).

    ``scale`` multiplies every lookup (Gemma: ``sqrt(embed_dim)``, written ``${dim ** 0.5}``).
    As in Gemma, the factor is first rounded to the table's dtype: in bfloat16 sqrt(3072) =
    55.43 becomes 55.5, and a bf16 checkpoint reproduces its original activations only so.
    """

    def __init__(self, *, vocab_size: int, embed_dim: int, dtype: torch.dtype = torch.float32,
                 scale: float | None = None) -> None:
        super().__init__()
        weight = torch.empty(vocab_size, embed_dim)
        nn.init.normal_(weight, mean=0.0, std=0.02)
        self.weight = nn.Parameter(weight.to(dtype))
        self.scale = scale

    def forward(self, tokens: Tensor) -> Tensor:
        out = F.embedding(tokens, self.weight)  # (B, T, D)
        if self.scale is None:
            return out
        factor = torch.tensor(self.scale, dtype=torch.float32, device=out.device).to(out.dtype)  # Gemma's rounding
        return out * factor

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}" + (f", scale={self.scale}" if self.scale else "")


class TokenEmbeddingParams(ComponentParams):
    vocab_size: int = Field(gt=0, description="number of token ids (rows of the table)")
    embed_dim: int = Field(gt=0, description="width of each embedding vector")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="storage dtype of the table and of its lookups (bfloat16: modded-nanogpt's embedding)")
    scale: float | None = Field(None, gt=0.0, description="multiply each lookup by this, rounded to the table's dtype "
                                "(None: no scaling; Gemma: sqrt(embed_dim))")


@register(
    "embed.token",
    hf={"default": (HFName("weight", ("weight",)),)},  # transformers' names
    params=TokenEmbeddingParams,
    inputs=("tokens",),
    decode="stateless",
    tie_param="weight",
    examples=[Example({"vocab_size": 50, "embed_dim": 16}, {"tokens": ((2, 8), torch.long)}),
              Example({"vocab_size": 50, "embed_dim": 16, "dtype": "bfloat16"}, {"tokens": ((2, 8), torch.long)}),
              Example({"vocab_size": 50, "embed_dim": 16, "scale": 4.0}, {"tokens": ((2, 8), torch.long)})],
)
def build_token_embedding(p: TokenEmbeddingParams, ins: Inputs) -> TokenEmbedding:
    return TokenEmbedding(vocab_size=p.vocab_size, embed_dim=p.embed_dim, dtype=getattr(torch, p.dtype), scale=p.scale)
