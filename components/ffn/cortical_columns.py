"""ffn.cortical_columns: Brain-Inspired GPT V1's CorticalColumnMLP followed by LateralInhibition."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentError, ComponentParams, Example, Inputs, register


def random_two_of_four(groups: int) -> Tensor:
    """(4 * groups,) bool: in every block of 4 consecutive entries, 2 chosen at random are True."""
    ranks = torch.rand(groups, 4).argsort(dim=-1).argsort(dim=-1)  # (G, 4) random permutation ranks
    return (ranks < 2).reshape(-1)


def magnitude_two_of_four(w: Tensor) -> Tensor:
    """(O, I) bool mask keeping, in each row, the 2 largest |w| of every 4 consecutive inputs."""
    o, i = w.shape
    groups = w.detach().abs().reshape(o, i // 4, 4)  # (O, I/4, 4)
    keep = groups.topk(2, dim=-1).indices  # (O, I/4, 2)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(o, i)


class LateralInhibition(nn.Module):
    """Columns inhibit each other: ``y = relu(x * (1 - a W_inh))`` per column.

    x (B, T, C*S) is viewed as C columns of S units; a (B, T, C) holds the column means;
    W_inh (C, C) starts at ``inhibition_init`` off the diagonal and 0 on it, unconstrained
    afterwards (a negative mean excites). The ReLU makes the output non-negative.
    """

    def __init__(self, *, num_columns: int, column_size: int, inhibition_init: float = 0.1) -> None:
        super().__init__()
        self.num_columns, self.column_size = num_columns, column_size
        off_diag = 1.0 - torch.eye(num_columns)
        self.inhibition = nn.Parameter(inhibition_init * off_diag)  # W_inh (C, C)

    def forward(self, x: Tensor) -> Tensor:
        cols = x.unflatten(-1, (self.num_columns, self.column_size))  # (B, T, C, S)
        iota = cols.mean(dim=-1) @ self.inhibition  # (B, T, C)
        return F.relu(cols * (1.0 - iota[..., None])).flatten(-2)  # (B, T, D)


class CorticalColumnMLP(nn.Module):
    """Masked two-layer GELU MLP, no biases, then lateral inhibition between columns.

    ``y = Inhibit((W2 * M2) gelu((W1 * M1) x))`` with W1 (H, D), W2 (D, H), H = hidden_dim.
    Shapes: x (B, T, D) -> (B, T, D). Reproduces Brain-Inspired GPT V1
    (``comsa33/brain-inspired-gpt`` @ 2beb863, ``brain_gpt/core``: CorticalColumnMLP and
    LateralInhibition; SEEDS.md §3.2, §3.3).

    ``faithful`` (as published): M1 keeps 2 random *rows* (hidden units) of every 4 and M2
    keeps 2 random *columns* of every 4, drawn independently. Flagged: this is not NVIDIA 2:4
    (which is along the reduction dimension of every row) and gives no speedup; a hidden unit
    is live only if both masks keep it, so about **25% of hidden units are live**, not 50%;
    the backward is straight-through, so masked weights get the full gradient and keep
    changing although the forward never uses them.

    ``fixed`` (the default; the "2:4 structured sparsity" promised): in every row of W1 and
    W2, of every 4 consecutive weights along the input dimension exactly 2 are zero. The
    mask keeps the 2 largest magnitudes at init and is fixed afterwards; the stored weights
    are zeroed at build and the forward uses W * M, so masked weights get zero gradient and
    stay zero under AdamW (decoupled weight decay keeps a zero at zero).
    ``to_semi_structured()`` swaps in ``torch.sparse`` semi-structured weights for CUDA
    fp16/bf16 inference, where the 2:4 sparse tensor cores make it faster.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        hidden_dim: int,
        num_columns: int,
        column_size: int,
        inhibition_init: float = 0.1,
        mode: Literal["faithful", "fixed"] = "fixed",
    ) -> None:
        super().__init__()
        self.mode = mode
        self.semi_structured = False
        self.w1 = nn.Parameter(torch.empty(hidden_dim, embed_dim))  # (H, D)
        self.w2 = nn.Parameter(torch.empty(embed_dim, hidden_dim))  # (D, H)
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))  # nn.Linear's default
        nn.init.kaiming_uniform_(self.w2, a=math.sqrt(5))
        if mode == "faithful":
            m1 = random_two_of_four(hidden_dim // 4)[:, None].expand(hidden_dim, embed_dim)  # rows
            m2 = random_two_of_four(hidden_dim // 4)[None, :].expand(embed_dim, hidden_dim)  # columns
        else:
            m1, m2 = magnitude_two_of_four(self.w1), magnitude_two_of_four(self.w2)
            with torch.no_grad():
                self.w1.mul_(m1)
                self.w2.mul_(m2)
        self.register_buffer("m1", m1.to(self.w1.dtype).contiguous())
        self.register_buffer("m2", m2.to(self.w2.dtype).contiguous())
        self.inhibit = LateralInhibition(
            num_columns=num_columns, column_size=column_size, inhibition_init=inhibition_init
        )

    def _masked(self, w: Tensor, m: Tensor) -> Tensor:
        if self.semi_structured:
            return w  # already 2:4 sparse, masked entries are not stored
        if self.mode == "faithful":
            return w + (w * m - w).detach()  # forward uses w * m, backward straight-through
        return w * m

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(F.linear(x, self._masked(self.w1, self.m1)))  # (B, T, H)
        y = F.linear(h, self._masked(self.w2, self.m2))  # (B, T, D)
        return self.inhibit(y)

    @torch.no_grad()
    def to_semi_structured(self) -> CorticalColumnMLP:
        """Replace W1, W2 by ``torch.sparse`` semi-structured (2:4) tensors for inference.

        Only for ``fixed`` mode on CUDA with fp16/bf16 weights (the 2:4 sparse tensor cores);
        the module is frozen afterwards. Raises RuntimeError where unsupported.
        """
        if self.mode != "fixed":
            raise RuntimeError("to_semi_structured needs mode: fixed (faithful masks are not 2:4)")
        if not (self.w1.is_cuda and self.w1.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError("to_semi_structured needs CUDA fp16/bf16 weights")
        from torch.sparse import to_sparse_semi_structured

        self.w1 = nn.Parameter(to_sparse_semi_structured(self.w1 * self.m1), requires_grad=False)
        self.w2 = nn.Parameter(to_sparse_semi_structured(self.w2 * self.m2), requires_grad=False)
        self.semi_structured = True
        return self


class CorticalColumnsParams(ComponentParams):
    hidden_dim: int | None = Field(None, gt=0, description="hidden width H, a multiple of 4 (None: 4 * embed_dim, as published)")
    num_columns: int = Field(16, gt=0, description="columns C of the lateral inhibition")
    column_size: int = Field(32, gt=0, description="units per column S; num_columns * column_size must equal the width")
    inhibition_init: float = Field(0.1, description="initial off-diagonal inhibition weight")
    mode: Literal["faithful", "fixed"] = Field(
        "fixed",
        description="faithful: independent random row/column 2-of-4 masks (about 25% live units); "
        "fixed: true 2:4 sparsity along the input dimension",
    )


@register(
    "ffn.cortical_columns",
    params=CorticalColumnsParams,
    decode="stateless",
    flags=("not-2:4 + ~25% live units + straight-through masked weights (faithful)",),
    examples=[
        Example({"num_columns": 4, "column_size": 4}, {"x": (2, 8, 16)}),
        Example({"num_columns": 4, "column_size": 4, "mode": "faithful"}, {"x": (2, 8, 16)}),
        Example({"hidden_dim": 32, "num_columns": 2, "column_size": 8, "inhibition_init": 0.3}, {"x": (2, 6, 16)}),
    ],
)
def build_cortical_columns(p: CorticalColumnsParams, ins: Inputs) -> CorticalColumnMLP:
    d = ins["x"].dim
    h = 4 * d if p.hidden_dim is None else p.hidden_dim
    if p.num_columns * p.column_size != d:
        raise ComponentError(
            "num_columns * column_size must equal the input width for the lateral inhibition",
            param="column_size",
            expected=f"num_columns * column_size = {d}",
            got=f"{p.num_columns} * {p.column_size} = {p.num_columns * p.column_size}",
            fix=f"use column_size: {d // p.num_columns}" if d % p.num_columns == 0 else None,
        )
    if h % 4 or (p.mode == "fixed" and d % 4):
        raise ComponentError(
            "2-of-4 masks need the hidden width (and, in fixed mode, the input width) to be multiples of 4",
            param="hidden_dim",
            expected="multiples of 4",
            got=f"hidden_dim {h}, width {d}",
        )
    return CorticalColumnMLP(
        embed_dim=d,
        hidden_dim=h,
        num_columns=p.num_columns,
        column_size=p.column_size,
        inhibition_init=p.inhibition_init,
        mode=p.mode,
    )
