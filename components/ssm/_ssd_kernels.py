"""Pure-PyTorch kernels for the Mamba-2 state-space dual (SSD) scan, shared by ``ssm.ssd``.

The recurrence, per head h (state h_t of shape (P, N), P = head_dim, N = d_state)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t

``ssd_chunked`` evaluates it for a whole sequence in chunks of ``chunk_size`` tokens with
matrix products only (Dao & Gu 2024, "Transformers are SSMs", the SSD "minimal" algorithm):
inside a chunk the output is a masked, decayed attention-like product; across chunks only
the (P, N) states travel. It has two layouts of the same arithmetic, picked by device:

- ``head_major`` (CUDA): every product batched per head, (b, G, R, c, L, features); the
  states cross chunks through one (c+1) x (c+1) decay matrix per head.
- ``folded`` (CPU): the products that do not need a per-head decay run once per group with
  the heads folded into the columns, (L, N) @ (N, R*P) and (N, L) @ (L, R*P), which CPU GEMM
  libraries run about 3x faster than R separate 64 x 64 products; the states cross chunks in
  a c-step loop of elementwise updates (c = T / chunk_size), which costs less than the
  decay-matrix product here.

``ssd_step`` is the one-token recurrence used for generation. The D skip is not part of
either kernel.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._chunks import pad_time

__all__ = ["segsum", "ssd_chunked", "ssd_step"]

Layout = Literal["head_major", "folded"]


def segsum(a: Tensor) -> Tensor:
    """Segment sums ``out[..., i, j] = sum_{k=j+1}^{i} a[..., k]`` for i >= j, -inf above.

    Built by a masked cumulative sum rather than ``cumsum[i] - cumsum[j]`` so long chunks do
    not lose precision to cancellation. a: (..., L) -> (..., L, L).
    """
    L = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, L)  # (..., L, L): a[..., k, j] = a_k
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~below, 0.0)
    s = torch.cumsum(a, dim=-2)  # s[i, j] = sum_{j<k<=i} a_k
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=0)
    return s.masked_fill(~keep, float("-inf"))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int,
    initial_state: Tensor | None = None,
    layout: Layout | None = None,
) -> tuple[Tensor, Tensor]:
    """The SSD scan over a whole sequence; returns ``(y, final_state)``.

    Shapes: x (b, T, H, P), dt (b, T, H) (already positive), A (H,) (negative), B and C
    (b, T, G, N) with G dividing H (group g serves heads g*H/G .. (g+1)*H/G - 1),
    initial_state (b, H, P, N) or None. y is (b, T, H, P); final_state is (b, H, P, N), the
    state after the last real token. T is padded at the end to a multiple of ``chunk_size``
    with dt = 0 and x = B = C = 0, which neither decays nor feeds the state, so padding is
    causal and leaves the final state unchanged. ``layout`` (see the module docstring)
    defaults to ``folded`` on CPU and ``head_major`` elsewhere; both compute the same
    function (tested against each other and against a sequential scan).
    """
    T = x.shape[1]
    x, dt, B, C = pad_time(chunk_size, x, dt, B, C)
    if layout is None:
        layout = "folded" if x.device.type == "cpu" else "head_major"
    if layout == "folded":
        y, final_state = _ssd_folded(x, dt, A, B, C, chunk_size, initial_state)
    elif layout == "head_major":
        y, final_state = _ssd_head_major(x, dt, A, B, C, chunk_size, initial_state)
    else:
        raise ValueError(f"ssd_chunked: layout must be 'head_major' or 'folded', not {layout!r}")
    return y[:, :T], final_state


def _ssd_head_major(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``ssd_chunked`` with every product batched per head; T a multiple of chunk_size."""
    b, _, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    c, L, R = x.shape[1] // chunk_size, chunk_size, H // G

    # head-major layouts (b, G, R, c, L, features): heads split as G groups of R, so one
    # C.B product serves all R heads of a group, and every product below is a batched matmul
    xd = (x * dt.unsqueeze(-1)).reshape(b, c, L, G, R, P).permute(0, 3, 4, 1, 2, 5)  # (b, G, R, c, L, P)
    Bc = B.reshape(b, c, L, G, 1, N).permute(0, 3, 4, 1, 2, 5)  # (b, G, 1, c, L, N)
    Cc = C.reshape(b, c, L, G, 1, N).permute(0, 3, 4, 1, 2, 5)  # (b, G, 1, c, L, N)
    # decays are computed in fp32 whatever the input dtype (bf16 cumsums drift), then cast
    a = (dt.float() * A.float()).reshape(b, c, L, G, R).permute(0, 3, 4, 1, 2)  # (b, G, R, c, L): log-decay per step
    a_cum = torch.cumsum(a, dim=-1)  # (b, G, R, c, L)

    # 1. within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + .. + a_i) xd_j.
    # Inside one chunk the cumulative sums stay small, so a difference of them is accurate;
    # the mask goes on before exp so no inf (or its gradient) ever appears.
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device))
    seg = (a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = (Cc @ Bc.transpose(-1, -2)) * torch.exp(seg).to(x.dtype)  # (b, G, R, c, L, L)
    y = scores @ xd  # (b, G, R, c, L, P)

    # 2. the state each chunk leaves behind, starting from zero at the chunk's start
    to_end = torch.exp(a_cum[..., -1:] - a_cum).to(x.dtype).unsqueeze(-1)  # (b, G, R, c, L, 1): step j -> chunk end
    states = (xd * to_end).transpose(-1, -2) @ Bc  # (b, G, R, c, P, N)

    # 3. carry states across chunks: a (c+1)-step recurrence written as one product.
    # Row z of exp(segsum) holds the decay from the end of chunk z' to the end of chunk z.
    totals = F.pad(a_cum[..., -1], (1, 0))  # (b, G, R, c+1): log-decay of each chunk, 0 first
    chunk_decay = torch.exp(segsum(totals)).to(x.dtype)  # (b, G, R, c+1, c+1)
    carried = chunk_decay[..., 1:] @ states.reshape(b, G, R, c, P * N)  # (b, G, R, c+1, P*N)
    if initial_state is not None:
        init = initial_state.to(carried.dtype).reshape(b, G, R, 1, P * N)
        carried = carried + chunk_decay[..., :1] * init
    entering = carried[..., :-1, :].reshape(b, G, R, c, P, N)  # state entering each chunk
    final_state = carried[..., -1, :].reshape(b, H, P, N)  # state after the last chunk

    # 4. what the entering state contributes to each output of its chunk
    from_start = torch.exp(a_cum).to(x.dtype).unsqueeze(-1)  # (b, G, R, c, L, 1): chunk start -> step i
    y = y + (Cc @ entering.transpose(-1, -2)) * from_start  # (b, G, R, c, L, P)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * L, H, P)  # (b, T, H, P)
    return y, final_state


def _ssd_folded(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``ssd_chunked`` with the heads of a group folded into the columns of the state
    products (the CPU layout); T a multiple of chunk_size."""
    b, _, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    c, L, R = x.shape[1] // chunk_size, chunk_size, H // G
    a_cum = (dt.float() * A.float()).view(b, c, L, H).cumsum(2)  # (b, c, L, H), fp32 as above
    xd = (x * dt.unsqueeze(-1).to(x.dtype)).view(b, c, L, G, R * P)  # (b, c, L, G, R*P)
    Bc = B.view(b, c, L, G, N).transpose(2, 3)  # (b, c, G, L, N)
    Cc = C.view(b, c, L, G, N).transpose(2, 3)  # (b, c, G, L, N)

    # 1. within each chunk (per head: the decay differs by head), as in _ssd_head_major
    ah = a_cum.view(b, c, L, G, R).permute(0, 1, 3, 4, 2)  # (b, c, G, R, L)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device))
    seg = (ah.unsqueeze(-1) - ah.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # (b, c, G, R, L, L)
    scores = (Cc @ Bc.transpose(-1, -2)).unsqueeze(3) * torch.exp(seg).to(x.dtype)  # (b, c, G, R, L, L)
    xh = xd.view(b, c, L, G, R, P).permute(0, 1, 3, 4, 2, 5)  # (b, c, G, R, L, P)
    y = (scores @ xh).permute(0, 1, 4, 2, 3, 5).reshape(b, c, L, H, P)  # (b, c, L, H, P)

    # 2. the state each chunk leaves behind, all heads of a group in one product:
    # B^T (N, L) @ (xd * decay to the chunk end) (L, R*P)
    to_end = torch.exp(a_cum[:, :, -1:, :] - a_cum).to(x.dtype)  # (b, c, L, H)
    xs = (xd.view(b, c, L, H, P) * to_end.unsqueeze(-1)).view(b, c, L, G, R * P).transpose(2, 3)  # (b, c, G, L, R*P)
    states = Bc.transpose(-1, -2) @ xs  # (b, c, G, N, R*P)

    # 3. carry states across chunks: c elementwise steps of (b, G, N, R*P)
    chunk_decay = torch.exp(a_cum[:, :, -1, :]).to(x.dtype).view(b, c, G, 1, R, 1)  # (b, c, G, 1, R, 1)
    if initial_state is None:
        S = x.new_zeros(b, G, N, R * P)
    else:  # (b, H, P, N) -> (b, G, N, R*P)
        S = initial_state.to(x.dtype).view(b, G, R, P, N).permute(0, 1, 4, 2, 3).reshape(b, G, N, R * P)
    entering = []
    for z in range(c):
        entering.append(S)
        S = (S.view(b, G, N, R, P) * chunk_decay[:, z]).view(b, G, N, R * P) + states[:, z]
    final_state = S.view(b, G, N, R, P).permute(0, 1, 3, 4, 2).reshape(b, H, P, N)  # (b, H, P, N)

    # 4. the entering state's contribution, again one product per group: C (L, N) @ S (N, R*P)
    y_in = (Cc @ torch.stack(entering, 1)).transpose(2, 3).reshape(b, c, L, H, P)  # (b, c, L, H, P)
    y = y + y_in * torch.exp(a_cum).to(x.dtype).unsqueeze(-1)  # chunk start -> step i
    return y.reshape(b, c * L, H, P), final_state


def ssd_step(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrent step: x (b, H, P), dt (b, H), A (H,), B and C (b, G, N), state (b, H, P, N).

    Returns ``(y (b, H, P), new_state)``; constant memory and work per token.
    """
    H, G = x.shape[1], B.shape[1]
    B = B.repeat_interleave(H // G, dim=1)  # (b, H, N)
    C = C.repeat_interleave(H // G, dim=1)  # (b, H, N)
    decay = torch.exp(dt * A)  # (b, H)
    state = state * decay[..., None, None] + (dt[..., None] * x).unsqueeze(-1) * B.unsqueeze(-2)  # (b, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state
