"""embed.prime_hilbert: QLLM's PrimeHilbertEncoder, a token embedding factored through small
"prime subspaces", each carrying its own sinusoidal position code."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, decode_context, register


def prime_position_table(primes: tuple[int, ...]) -> tuple[list[float], list[float], list[bool]]:
    """Per output channel of the concatenated code: its frequency, its prime, sin or cos.

    For a prime p the first ceil(p/2) channels are sines and the remaining floor(p/2) cosines,
    with w_k = 10000^(-k/p) and k counting from 0 within each half.
    """
    omega, prime, is_sin = [], [], []
    for p in primes:
        n_sin, n_cos = (p + 1) // 2, p // 2
        for k in list(range(n_sin)) + list(range(n_cos)):
            omega.append(10000.0 ** (-k / p))
            prime.append(float(p))
        is_sin += [True] * n_sin + [False] * n_cos
    return omega, prime, is_sin


class PrimeHilbertEncoder(nn.Module):
    """QLLM's PrimeHilbertEncoder (``sschepis/qllm@6a5cb1a``, ``src/model/prime_hilbert_encoder.py``)
    followed by the model's projection and LayerNorm, as one token embedding.

    For a token w at position n, with one base embedding E_b (V x base_dim) and a list of primes::

        x_p = P_p E_b[w] + b_p + PE_p(n)                 for each prime p   (p channels)
        PE_p(n)_k = sin(n w_k + (n mod p)/p)               k < ceil(p/2)
                  = cos(n w_k' + (n mod p)/p)              the floor(p/2) channels after
        w_k = 10000^(-k/p)                                 (k counts from 0 in each half)
        h = LayerNorm(W_enc concat_p(x_p) + b_enc)         (sum p -> embed_dim)

    Shapes: tokens (B, T) long -> (B, T, embed_dim). Positions are clamped to max_seq_len - 1
    (as published: every position past the end shares the last code). During incremental
    decoding the positions start at ``decode_context().offset``.

    Per-token and causal. Note the published design caps the token embedding's rank at
    sum(primes) (67 for [7, 11, 13, 17, 19]): every token vector passes through that bottleneck.
    The position code is computed from the positions on the fly (a (T, sum p) table in float64,
    cast to the embedding dtype), rather than stored as a buffer.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        embed_dim: int,
        base_dim: int = 64,
        primes: tuple[int, ...] = (7, 11, 13, 17, 19),
        max_seq_len: int = 1024,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.base = nn.Embedding(vocab_size, base_dim)
        self.proj = nn.ModuleList([nn.Linear(base_dim, p) for p in primes])
        self.enc = nn.Linear(sum(primes), embed_dim)
        self.ln = nn.LayerNorm(embed_dim)
        # plain Python lists: constants rebuilt on the input's device, so a meta build needs no
        # materialisation of a buffer
        self._omega, self._prime, self._is_sin = prime_position_table(tuple(primes))

    def position_code(self, T: int, offset: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        n = (torch.arange(T, device=device) + offset).clamp(max=self.max_seq_len - 1)
        n = n.to(torch.float64)[:, None]  # (T, 1)
        omega = torch.tensor(self._omega, dtype=torch.float64, device=device)  # (P,)
        prime = torch.tensor(self._prime, dtype=torch.float64, device=device)  # (P,)
        is_sin = torch.tensor(self._is_sin, dtype=torch.bool, device=device)  # (P,)
        angle = n * omega + torch.remainder(n, prime) / prime  # (T, P)
        return torch.where(is_sin, torch.sin(angle), torch.cos(angle)).to(dtype)  # (T, P)

    def forward(self, tokens: Tensor) -> Tensor:
        ctx = decode_context()
        offset = ctx.offset if ctx is not None else 0
        e = self.base(tokens)  # (B, T, base_dim)
        x = torch.cat([proj(e) for proj in self.proj], dim=-1)  # (B, T, sum p)
        x = x + self.position_code(tokens.shape[1], offset, x.device, x.dtype)
        return self.ln(self.enc(x))  # (B, T, D)


class PrimeHilbertParams(ComponentParams):
    vocab_size: int = Field(gt=0, description="number of token ids")
    embed_dim: int = Field(gt=0, description="output width D (the model width)")
    base_dim: int = Field(64, gt=0, description="width b of the base embedding E_b (64 in the runnable configs)")
    primes: tuple[int, ...] = Field(
        (7, 11, 13, 17, 19), min_length=1, description="subspace sizes; their sum is the rank bottleneck"
    )
    max_seq_len: int = Field(1024, gt=0, description="positions at or past this are clamped to max_seq_len - 1")

    @field_validator("primes")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(p < 1 for p in v):
            raise ValueError(f"every entry of primes must be >= 1, got {list(v)}")
        return v


@register(
    "embed.prime_hilbert",
    params=PrimeHilbertParams,
    inputs=("tokens",),
    decode="cached",
    examples=[
        Example({"vocab_size": 50, "embed_dim": 32}, {"tokens": ((2, 8), torch.long)}),
        Example(
            {"vocab_size": 30, "embed_dim": 16, "base_dim": 8, "primes": [2, 3, 5], "max_seq_len": 6},
            {"tokens": ((2, 9), torch.long)},
            int_high=30,
        ),
    ],
)
def build_prime_hilbert(p: PrimeHilbertParams, ins: Inputs) -> PrimeHilbertEncoder:
    return PrimeHilbertEncoder(
        vocab_size=p.vocab_size,
        embed_dim=p.embed_dim,
        base_dim=p.base_dim,
        primes=p.primes,
        max_seq_len=p.max_seq_len,
    )


__all__ = ["PrimeHilbertEncoder", "PrimeHilbertParams", "prime_position_table"]
