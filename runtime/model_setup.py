"""The trainer's model installation: where a (re)built model goes on the device, how it is wrapped
for data parallelism, whether the LM head and loss are fused, and how it is compiled.

With ``train.compile`` set to a mode, the model and the loss are compiled together
(``torch.compile(mode=...)``; ``default`` passes no mode): the log-softmax fuses into the head's
output instead of materialising fp32 logits.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from physlm_graph._errors import TrainingError

from .checkpoint import model_context
from .distributed import wrap_model
from .fused_head import FusedLossModule

__all__ = ["install_model", "fused_split"]


def install_model(t: Any, cm: Any) -> None:
    """Install ``cm`` on trainer ``t``: ``t.model`` (on the device, training mode), ``t.wrapped`` (DDP
    or FSDP2), ``t.forward`` and ``t.forward_loss`` (compiled as ``train.compile`` says),
    ``t.fused_loss``, ``t.seq_len``, ``t.autocast`` and ``t.dtype_name``."""
    t.cm = cm
    if not getattr(cm.module, "_checkpointing_done", False):  # growth installs each stage's new model once
        from physlm_graph._passes import checkpoint_blocks

        t.checkpointed = checkpoint_blocks(cm.module, cm.resolved, t.cfg.checkpointing)
        cm.module._checkpointing_done = True
    t.model = cm.module.to(t.device)
    t.model.train()
    blocks = [p for paths in cm.resolved.instances.values() for p in paths]
    use_bf16 = t.cfg.dtype == "bfloat16" or (
        t.cfg.dtype == "auto" and t.device.type == "cuda" and torch.cuda.is_bf16_supported())
    mode = t.cfg.compile
    compile_ = functools.partial(torch.compile, mode=None if mode == "default" else mode)
    split = fused_split(t)
    if split is None:  # FSDP2 under bf16: gather bf16 weights (half the traffic), reduce gradients in fp32
        t.wrapped = wrap_model(t.model, t.dist, t.strategy, blocks,
                               bucket_mb=t.cfg.ddp_bucket_mb, bucket_view=t.cfg.ddp_bucket_view,
                               param_dtype=torch.bfloat16 if use_bf16 else None,
                               reduce_dtype=t.cfg.ddp_reduce_dtype)
        t.forward = compile_(t.wrapped) if mode else t.wrapped

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return t.compute_loss(t.wrapped(x), y)
    else:
        # the training module computes the loss inside its forward (so DDP sees the head's use);
        # evaluation and generation keep the original module, which shares every parameter
        t.wrapped = wrap_model(FusedLossModule(*split), t.dist, t.strategy, blocks,
                               bucket_mb=t.cfg.ddp_bucket_mb, bucket_view=t.cfg.ddp_bucket_view,
                               reduce_dtype=t.cfg.ddp_reduce_dtype)
        t.forward = compile_(t.model) if mode else t.model

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            ce, out = t.wrapped(x, y)
            return t.compute_loss(out, y, ce=ce)

    t.fused_loss = split is not None
    # with compile, the loss joins the compiled region: the log-softmax fuses into the head's
    # output instead of materialising fp32 logits (GPT-2 on an H100: 31.5% -> 41.7% MFU)
    t.forward_loss = compile_(forward_loss) if mode else forward_loss
    ctx = model_context(cm)
    t.seq_len = t.cfg.seq_len or ctx
    if t.seq_len is None:
        raise TrainingError("no sequence length: the blueprint has no context param and train.seq_len is unset",
                            fix="pass --set train.seq_len=N")
    if ctx is not None and t.seq_len > ctx:
        raise TrainingError(f"seq_len {t.seq_len} is longer than the model's context {ctx}",
                            fix=f"use seq_len <= {ctx}, or raise the context param")
    t.autocast = (lambda: torch.autocast(t.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    t.dtype_name = "bfloat16 autocast" if use_bf16 else "float32"

def fused_split(t: Any) -> tuple[Any, Any] | None:
    """The model split into body and head for the fused head + loss, or None (train.fused_loss)."""
    from .fused_head import split_lm_head

    mode = t.cfg.fused_loss
    if mode is False:
        return None
    if t.dist.enabled and t.strategy == "fsdp":
        why = "FSDP2 shards the head with the root module; the fused loss runs under DDP or on one device"
    else:
        from physlm_graph.components.head._linear_ce import triton_available

        split = split_lm_head(t.model)
        why = split if isinstance(split, str) else None
        if why is None and mode == "auto" and not (t.cfg.compile and t.device.type == "cuda" and triton_available):
            return None  # auto: only where it is measured to pay (compiled, CUDA, triton)
        if why is None:
            return split
    if mode is True:
        raise TrainingError(f"train.fused_loss is true but {why}", fix="set train.fused_loss: auto or false")
    return None
