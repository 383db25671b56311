"""Fused LM head + cross-entropy: ``mean CE(h W^T, y)`` with the loss's gradient made in the forward.

The usual compiled path writes the (N, V) logits (3.3 GB in bf16 for GPT-2 at 32 x 1024 tokens),
reads them for the log-softmax, reads them again in the backward and writes their gradient:
4.65 ms of a 67.8 ms GPT-2 step on an H100 for the two log-softmax kernels
(``benchmarks/gpt2_speed.py --profile``). Here, chunk by chunk of rows::

    G[c] = h[c] W^T                       # cuBLAS, into the chunk's rows of one (N, V) buffer
    lse_i = logsumexp_j G_ij              # one Triton program per row
    loss += sum_i (lse_i - G_{i,y_i})
    G_ij  = (softmax_ij - [j = y_i]) / n  # the gradient of the mean loss, written in place

One kernel does the loss and its gradient: it reads a row twice (the second time mostly from
L2: a row is 100 KB at GPT-2's vocabulary) and writes it once, with one exp per logit in each
pass. The backward is the usual two matmuls on G: dh = (G W) g, dW = (G^T h) g, with g the
incoming gradient of the loss. Rows whose target is ``ignore_index`` count neither in the loss
nor in n; if every row is ignored the loss is 0 with zero gradients (``F.cross_entropy`` gives
nan). A target outside [0, V) makes the loss nan (the trainer then stops, or skips the batch,
as for any nan loss): checking on the host would cost a synchronisation every step. The logits buffer is the only (N, V) tensor, in the matmul's dtype: no fp32 logits.

This is the scheme of Liger-Kernel's fused linear cross-entropy (gradients computed in the
forward, chunk by chunk); Apple's "Cut Cross-Entropy" (Wijmans et al. 2024) goes further and
never writes the logits at all, at the price of its own matmul kernel.

Without triton (CPU) the same chunked scheme runs in torch: the same function and gradients,
with at most one chunk of fp32 logits in memory besides G.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from physlm_graph._errors import PhysLMError

try:
    import triton
    import triton.language as tl

    triton_available = True
except ImportError:  # pragma: no cover - CPU-only installs
    triton_available = False

__all__ = ["linear_cross_entropy", "triton_available"]

# The kernel runs on CUDA tensors; on CPU tensors only when a test asks for Triton's interpreter
# with PHYSLM_LINEAR_CE_INTERPRET=1 (and TRITON_INTERPRET=1, read by triton). TRITON_INTERPRET
# alone is not enough: another test file sets it in-process for its own kernels.
_INTERPRET = os.environ.get("PHYSLM_LINEAR_CE_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"

IGNORE = -100
_MAX_BLOCK = 4096  # logits per step of a row's loop (the tests lower it to reach the multi-block paths)

if triton_available:

    @triton.jit
    def _ce_rows_kernel(g_ptr, stride_g, y_ptr, loss_ptr, scale_ptr, V, n_ids, ignore_index, BLOCK: tl.constexpr):
        """One row of the chunk: its loss, then its gradient written over its logits. The second pass
        reads the row again while it is still in L2 (a row is 100 KB at GPT-2's vocabulary). A row
        is V logits; targets must be below n_ids (columns past it hold -inf)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = g_ptr + row * stride_g
        y = tl.load(y_ptr + row)
        cols = tl.arange(0, BLOCK)
        # pass 1: sum_j exp(x_j - c) with c the first block's max: one exp per logit. If a later
        # logit exceeds c by more than ~88 the sum overflows; then the row is summed again with a
        # running per-lane max (two exps per logit), which cannot overflow.
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        c = tl.max(x, 0)
        s = tl.exp(x - c)
        for start in range(BLOCK, V, BLOCK):
            x = tl.load(ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            s += tl.exp(x - c)
        total = tl.sum(s, 0)
        lse = c + tl.log(total)
        if total > 3.0e38:  # inf: the rare row with a far larger logit after the first block
            m = tl.full((BLOCK,), -3.4028234663852886e38, tl.float32)  # finite: no inf - inf past V
            s = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, V, BLOCK):
                x = tl.load(ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, x)
                s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
                m = m_new
            mx = tl.max(m, 0)
            lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        valid = y != ignore_index
        inside = (y >= 0) & (y < n_ids)  # a target outside the vocabulary: a nan loss, never a read past the row
        y_safe = tl.where(valid & inside, y, 0)
        x_y = tl.load(ptr + y_safe).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, tl.where(inside, lse - x_y, float("nan")), 0.0))
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        # pass 2: the gradient of the mean loss, in place
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(ptr + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(idx == y_safe, 1.0, 0.0)) * scale
            tl.store(ptr + idx, g.to(g_ptr.dtype.element_ty), mask=idx < V)


def ce_rows(g: Tensor, y: Tensor, loss: Tensor, scale: Tensor, vocab: int, ignore_index: int = IGNORE,
            n_ids: int | None = None) -> None:
    """Launch the kernel on the rows of ``g`` (its first ``vocab`` columns): each row's loss into
    ``loss``, its gradient (scaled by the 1-element ``scale``) over its logits. ``n_ids`` (default
    ``vocab``): the real ids, for the target check; the caller has set the logits past them to -inf.

    ``_fwd_impl`` passes the padded row width as ``vocab`` (a multiple of 64), not the real ids:
    a width that Triton sees divisible by 16 lets it prove the mask constant over aligned groups
    of lanes and load them together. Given GPT-2's 50257 ids as the row length on rows of 50304,
    the kernel took 5.88 ms against 3.31 ms (H100, 32768 rows, ``benchmarks/linear_ce.py --limit
    50257``): 2.6 ms of every step the trainer ran with ``train.vocab_multiple`` until commit 6cadcfe."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    _ce_rows_kernel[(g.shape[0],)](g, g.stride(0), y, loss, scale, vocab, vocab if n_ids is None else n_ids,
                                   ignore_index, BLOCK=block, num_warps=8)


def _ce_rows_torch(g: Tensor, y: Tensor, loss: Tensor, scale: Tensor, ignore_index: int) -> None:
    """The kernel's work in torch, on one chunk (fp32 inside)."""
    x = g.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = y != ignore_index
    inside = (y >= 0) & (y < x.shape[1])
    y_safe = torch.where(valid & inside, y, torch.zeros_like(y))
    x_y = x.gather(1, y_safe[:, None]).squeeze(1)
    row_loss = torch.where(inside, lse - x_y, torch.full_like(lse, float("nan")))
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(lse)))
    p = torch.exp(x - lse[:, None])
    p.scatter_add_(1, y_safe[:, None], -torch.ones_like(lse)[:, None])
    p.mul_((scale * valid)[:, None])
    g.copy_(p)


def default_chunk(n: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk: about 1 GB of logits, at least 1024 rows (8192 at GPT-2's vocabulary in bf16).
    On an H100 chunks of 8192 rows were the fastest measured, 2048 as fast, 256 12% slower
    (``benchmarks/linear_ce.py``): small chunks cost the matmul more than L2 saves the loss."""
    rows = max(1024, (1 << 30) // max(1, vocab * itemsize))
    return min(n, 1 << (rows.bit_length() - 1))  # a power of two, for the matmul's tiling


def _padded(vocab: int) -> int:
    """The logits buffer's row length: the vocabulary rounded up to a multiple of 64. An odd row
    (GPT-2's 50257) leaves cuBLAS unaligned rows and made the fused loss 1.5x slower than the
    compiled one on an H100; the extra columns (zero weight rows) are set to -inf before the loss."""
    return -(-vocab // 64) * 64


def _pad_rows(w: Tensor) -> Tensor:
    vp = _padded(w.shape[0])
    return w if vp == w.shape[0] else torch.nn.functional.pad(w, (0, 0, 0, vp - w.shape[0]))


def _fwd_impl(h: Tensor, w: Tensor, y: Tensor, chunk: int, ignore_index: int, limit: int) -> tuple[Tensor, Tensor]:
    n, vocab = h.shape[0], w.shape[0]
    limit = min(limit, vocab) if limit > 0 else vocab  # the real ids; the rest get no probability
    g = torch.empty((n, _padded(vocab)), dtype=h.dtype, device=h.device)
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    n_valid = (y != ignore_index).sum()
    scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)  # on the device: no host sync
    scale1 = scale.reshape(1)
    wt = _pad_rows(w).t()
    use_triton = triton_available and (h.is_cuda or _INTERPRET)
    width = g.shape[1]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        gc = g[s:e]
        torch.mm(h[s:e], wt, out=gc)
        if use_triton:  # the kernel reads whole aligned rows: the columns past the real ids become -inf
            if limit < width:  # logits, so they get no probability and a zero gradient
                gc[:, limit:].fill_(float("-inf"))
            ce_rows(gc, y[s:e], losses[s:e], scale1, width, ignore_index, n_ids=limit)
        else:
            _ce_rows_torch(gc[:, :limit], y[s:e], losses[s:e], scale, ignore_index)
            if limit < vocab:
                gc[:, limit:vocab].zero_()  # the padded ids' logits: no gradient (as -inf logits give)
    loss = losses.sum() * scale
    return loss, g


@torch.library.custom_op("physlm_graph::linear_ce_fwd", mutates_args=())
def _fwd_op(h: Tensor, w: Tensor, y: Tensor, chunk: int, ignore_index: int, limit: int) -> tuple[Tensor, Tensor]:
    return _fwd_impl(h, w, y, chunk, ignore_index, limit)


@_fwd_op.register_fake
def _(h, w, y, chunk, ignore_index, limit):
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], _padded(w.shape[0])))


def _setup(ctx, inputs, output):
    h, w, y, chunk, ignore_index, limit = inputs
    _, g = output
    ctx.save_for_backward(h, w, g)
    ctx.mark_non_differentiable(g)
    ctx.set_materialize_grads(False)  # no zero-filled (N, V) gradient for g (1 ms at GPT-2's size)


def _backward(ctx, dloss, dg):
    h, w, g = ctx.saved_tensors  # g: (N, padded V); its extra columns meet zero rows of the padded w
    go = dloss.to(h.dtype)
    dh = torch.mm(g, _pad_rows(w)) * go
    dw = torch.mm(g.t(), h)[: w.shape[0]] * go
    return dh, dw, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, *, ignore_index: int = IGNORE,
                         chunk: int | None = None, limit: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` against ``target``, fused (see the module).

    h (..., D), weight (V, D), target (...) int64 -> a 0-dim fp32 loss, equal to
    ``F.cross_entropy((h @ weight.T).float().flatten(0, -2), target.flatten(), ignore_index=...)``
    up to the rounding of the logits to the matmul's dtype. Under CUDA/CPU autocast both operands
    go to the autocast dtype, as ``F.linear`` would; gradients reach h and weight. ``limit``: only
    the first ``limit`` rows of weight are real ids (``head.lm``'s ``logit_limit``); the others
    count as -inf logits (no probability, zero gradient), and a target past them makes the loss nan.
    """
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise PhysLMError(f"linear_cross_entropy: h (..., {h.shape[-1]}) does not match weight {tuple(weight.shape)}")
    if h.shape[:-1] != target.shape:
        raise PhysLMError(f"linear_cross_entropy: target {tuple(target.shape)} does not match h {tuple(h.shape[:-1])}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    h2 = h.reshape(-1, h.shape[-1]).to(dtype)
    w2 = weight.to(dtype)
    y = target.reshape(-1)
    with torch.autocast(dev, enabled=False):
        c = chunk or default_chunk(h2.shape[0], w2.shape[0], h2.element_size())
        loss, _ = _fwd_op(h2, w2, y, int(c), int(ignore_index), int(limit or 0))
    return loss
