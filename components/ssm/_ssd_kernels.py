"""Pure-PyTorch kernels for the Mamba-2 state-space dual (SSD) scan, shared by ``ssm.ssd``.

The recurrence, per head h (state h_t of shape (P, N), P = head_dim, N = d_state)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t

``ssd_chunked`` evaluates it for a whole sequence in chunks of ``chunk_size`` tokens with
matrix products only (Dao & Gu 2024, "Transformers are SSMs", the SSD "minimal" algorithm):
inside a chunk the output is a masked, decayed attention-like product; across chunks only
the (P, N) states travel, through a small (c+1) x (c+1) decay matrix. ``ssd_step`` is the
one-token recurrence used for generation. The D skip is not part of either kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["segsum", "ssd_chunked", "ssd_step"]


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
) -> tuple[Tensor, Tensor]:
    """The SSD scan over a whole sequence; returns ``(y, final_state)``.

    Shapes: x (b, T, H, P), dt (b, T, H) (already positive), A (H,) (negative), B and C
    (b, T, G, N) with G dividing H (group g serves heads g*H/G .. (g+1)*H/G - 1),
    initial_state (b, H, P, N) or None. y is (b, T, H, P); final_state is (b, H, P, N), the
    state after the last real token. T is padded at the end to a multiple of ``chunk_size``
    with dt = 0 and x = B = C = 0, which neither decays nor feeds the state, so padding is
    causal and leaves the final state unchanged.
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    pad = (-T) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
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

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * L, H, P)[:, :T]  # (b, T, H, P)
    return y, final_state


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
