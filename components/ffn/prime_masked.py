"""ffn.prime_masked: QLLM's MaskedFeedForward, an MLP whose first layer has a prime-resonance mask."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


def prime_resonance_mask(rows: int, cols: int, primes: tuple[int, ...]) -> Tensor:
    """(rows, cols) bool: M_ij = 1 iff i, j < min(rows, cols) and (i - j) mod p = 0 for some p."""
    n = min(rows, cols)
    i = torch.arange(rows)[:, None, None]  # (R, 1, 1)
    j = torch.arange(cols)[None, :, None]  # (1, C, 1)
    p = torch.tensor(primes)[None, None, :]  # (1, 1, P)
    hit = ((i - j) % p == 0).any(dim=-1)  # (R, C); torch's % takes the divisor's sign, like Python
    return hit & (i[..., 0] < n) & (j[..., 0] < n)


class PrimeMaskedFeedForward(nn.Module):
    """``y = W2 dropout(gelu((W1 * M) x + b1)) + b2`` with a fixed prime-resonance mask M on W1.

    W1 (F, D), W2 (D, F), both with bias; M (F, D) from ``prime_resonance_mask``. Shapes:
    x (B, T, D) -> (B, T, D). Reproduces QLLM's ``MaskedFeedForward`` (``sschepis/qllm``
    @ 6a5cb1a, ``src/model/resonance_block.py``; SEEDS.md §4.3). The mask keeps, inside the
    top-left min(F, D) square, the diagonals whose offset is a multiple of a prime (density
    1 - prod(1 - 1/p), about 0.36 for 7..19); all rows i >= D are zero, so with F = 4 D three
    quarters of the hidden units get no input weights and emit the constant gelu(b1)
    (as published, in both modes: it is the published architecture).

    ``faithful`` (as published): W1 is zeroed under M at build and overwritten in place with
    W1 * M at the start of every *training-mode* forward. Flagged: masked entries still get
    gradients, so after the last optimizer step they are non-zero in eval mode and in
    checkpoints.

    ``fixed`` (the default): the forward uses W1 * M, so masked weights get zero gradient and
    stay exactly zero (they are also zeroed at build); eval equals train.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        hidden_dim: int,
        primes: tuple[int, ...] = (7, 11, 13, 17, 19),
        dropout: float = 0.1,
        mode: Literal["faithful", "fixed"] = "fixed",
    ) -> None:
        super().__init__()
        self.mode = mode
        self.fc = nn.Linear(embed_dim, hidden_dim)  # W1 (F, D), b1
        self.proj = nn.Linear(hidden_dim, embed_dim)  # W2 (D, F), b2
        self.drop = nn.Dropout(dropout)
        self.register_buffer("mask", prime_resonance_mask(hidden_dim, embed_dim, primes).to(self.fc.weight.dtype))
        self.after_init_scheme()

    @torch.no_grad()
    def after_init_scheme(self) -> None:
        """Masked weights are zero at build, also after a blueprint's ``init:`` scheme redrew W1."""
        self.fc.weight.mul_(self.mask)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "faithful":
            if self.training:
                with torch.no_grad():  # as published: re-impose the mask on the stored weights
                    self.fc.weight.mul_(self.mask)
            w1 = self.fc.weight
        else:
            w1 = self.fc.weight * self.mask
        h = self.drop(F.gelu(F.linear(x, w1, self.fc.bias)))  # (B, T, F)
        return self.proj(h)


class PrimeMaskedParams(ComponentParams):
    hidden_dim: int = Field(gt=0, description="hidden width F (QLLM: 4 * its hidden_dim)")
    primes: tuple[int, ...] = Field(
        (7, 11, 13, 17, 19), min_length=1, description="moduli p: M_ij = 1 iff (i - j) mod p = 0 for some p"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the hidden activations")
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="faithful: overwrite W1 with W1 * M at each training forward (as published); "
        "fixed: mask inside the forward, masked weights get no gradient",
    )

    @model_validator(mode="after")
    def _positive_primes(self) -> PrimeMaskedParams:
        if any(p < 1 for p in self.primes):
            raise ValueError(f"primes must be positive integers, got {list(self.primes)}")
        return self


@register(
    "ffn.prime_masked",
    params=PrimeMaskedParams,
    decode="stateless",
    flags=("masked weights drift after the last optimizer step (faithful)", "rows >= width get no inputs (as published)"),
    examples=[
        Example({"hidden_dim": 64, "dropout": 0.0}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 64, "mode": "faithful", "dropout": 0.0}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 12, "primes": [2, 3]}, {"x": (2, 5, 16)}),
    ],
)
def build_prime_masked(p: PrimeMaskedParams, ins: Inputs) -> PrimeMaskedFeedForward:
    return PrimeMaskedFeedForward(
        embed_dim=ins["x"].dim, hidden_dim=p.hidden_dim, primes=p.primes, dropout=p.dropout, mode=p.mode
    )
