"""embed.learned_position: learned absolute position embeddings (GPT-2 ``wpe``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register
from physlm_graph._registry import HFName
from physlm_graph.components._static_cache import static_cache


class LearnedPositionEmbedding(nn.Module):
    """Learned absolute positions: ``out[0, t] = weight[offset + t]``.

    Shapes: tokens (B, T) (only T is read) -> (1, T, embed_dim), broadcast over the batch when
    added to the token embeddings. ``offset`` is the absolute position of the first token of
    the chunk: ``decode_context().offset`` during incremental generation, else 0; with the
    decode engine's preallocated buffers, row b's positions are ``positions[b]`` and the output is
    (B, T, embed_dim). ``weight`` is
    (max_seq_len, embed_dim), initialised N(0, 0.02) as in GPT-2 / nanoGPT.
    """

    def __init__(self, *, max_seq_len: int, embed_dim: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.empty(max_seq_len, embed_dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        ctx = decode_context()
        static = static_cache(ctx)
        if static is not None:  # each row at its own positions, read from a tensor (no host sync)
            return self.weight[static.positions]  # (B, T, D)
        offset = ctx.offset if ctx is not None else 0
        seq_len = tokens.shape[1]
        if offset + seq_len > self.max_seq_len:
            raise ValueError(
                f"embed.learned_position: positions {offset}..{offset + seq_len - 1} do not fit "
                f"max_seq_len {self.max_seq_len}; shorten the sequence or raise max_seq_len"
            )
        return self.weight[offset : offset + seq_len].unsqueeze(0)  # (1, T, D)


class LearnedPositionParams(ComponentParams):
    max_seq_len: int = Field(gt=0, description="longest sequence (context length) the table covers")
    embed_dim: int = Field(gt=0, description="width of each position vector")


@register(
    "embed.learned_position",
    hf={"default": (HFName("weight", ("weight",)),)},  # transformers' names
    params=LearnedPositionParams,
    inputs=("tokens",),
    decode="cached",  # position-dependent: reads decode_context().offset
    examples=[Example({"max_seq_len": 16, "embed_dim": 16}, {"tokens": ((2, 8), torch.long)})],
)
def build_learned_position(p: LearnedPositionParams, ins: Inputs) -> LearnedPositionEmbedding:
    return LearnedPositionEmbedding(max_seq_len=p.max_seq_len, embed_dim=p.embed_dim)
