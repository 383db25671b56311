"""The table a training run prints before step 0: model, budget, optimizer, device, the
objective's terms with their weights, growth stages, data, tokenizer, output."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["describe_run"]


def _fsdp_label(t: Any) -> str:
    """How FSDP2 moves weights: the all-gather dtype the shards were wrapped with; for DDP,
    a bf16 gradient all-reduce."""
    if t.strategy != "fsdp":
        return ", bf16 gradient all-reduce" if t.cfg.ddp_reduce_dtype == "bfloat16" else ""
    # read back from FSDP2's own state (private; if a torch release moves it, say nothing)
    get_state = getattr(t.model, "_get_fsdp_state", None)
    policy = getattr(get_state(), "_mp_policy", None) if callable(get_state) else None
    if policy is None:
        return ""
    dtype = policy.param_dtype or torch.float32
    return f", {str(dtype).removeprefix('torch.')} all-gathers"


def _compile_label(mode: Any) -> str:
    if not mode:
        return ""
    return ", torch.compile" + ("" if mode == "default" else f" {mode}")


def _schedule_label(c: Any) -> str:
    decay = f", decay over the last {0.7 if c.decay_frac is None else c.decay_frac:g}" if c.schedule == "wsd" else ""
    return f"{c.schedule}, warmup {c.warmup}{decay}"


def describe_run(t: Any) -> None:
    """Print what trainer ``t`` (set up) will do."""
    from rich.table import Table

    c = t.cfg
    tab = Table(title=f"train {t.cm.name}", show_header=False, title_justify="left")
    tab.add_column(style="bold")
    tab.add_column()
    tab.add_row("model", f"{t.cm.name} (hash {t.cm.hash})")
    tab.add_row("params", f"{t.cm.num_params:,}")
    tab.add_row("FLOPs/token", f"{t.cm.flops_per_token:,.0f}")
    tab.add_row("tokens/step", f"{t.tokens_per_step:,} (batch {c.batch_size} x seq {t.seq_len} x accumulate {c.accumulate})")
    tab.add_row("steps", f"{c.steps:,}" + (f" (resuming at {t.step:,})" if t.step else ""))
    tab.add_row("total tokens", f"{c.steps * t.tokens_per_step:,}")
    if c.optimizers is None:
        floor = c.min_lr if c.min_lr is not None else 0.0 if c.schedule == "wsd" else c.lr / 10
        tab.add_row("optimizer", f"AdamW lr {c.lr:g} -> {floor:g} ({_schedule_label(c)}), wd {c.weight_decay:g}, "
                    f"clip {c.grad_clip:g}")
    else:
        from .recipe import describe_optimizers

        tab.add_row("optimizers", "\n".join(describe_optimizers(t.optimizer)))
        floor = "0" if c.schedule == "wsd" else "0.1 x"
        tab.add_row("schedule", f"{_schedule_label(c)}: each group's lr -> {floor} its lr, clip {c.grad_clip:g}")
    if c.init_rules:
        tab.add_row("init", f"by name pattern ({len(c.init_rules)} train.init_rules)")
    tab.add_row("device", f"{t.device} ({t.dtype_name}{_compile_label(c.compile)})"
                + (f", {t.dist.world} processes ({t.strategy}{_fsdp_label(t)})" if t.dist.enabled else ""))
    tab.add_row("loss", "final head: " + ("fused head + cross-entropy (train.fused_loss)" if t.fused_loss
                                          else "cross-entropy on the logits"))
    tab.add_row("objective", t.objective.describe(t.cm))
    if getattr(t, "checkpointed", None):
        kind = "block instances" if c.checkpointing == "blocks" or "every" in c.checkpointing else "components"
        tab.add_row("checkpointing", f"{len(t.checkpointed)} {kind} recomputed in backward (train.checkpointing)")
    if t.growth is not None:
        tab.add_row("growth", t.growth.describe())
    if t.plan.extensions:
        tab.add_row("extensions", ", ".join(t.plan.extensions))
    order = "read in order" if t.cfg.data_order == "sequential" else "random windows"
    tab.add_row("data", f"{t.data} ({len(t.train_tokens):,} train / {len(t.val_tokens):,} val tokens; {order})")
    tab.add_row("tokenizer", f"{t.tokenizer.name} ({t.tokenizer.vocab_size:,} tokens)")
    tab.add_row("output", str(t.out_dir) + (f" (resumed from {t.resume_from_path})" if t.resume_from_path else ""))
    if c.checkpoint_format == "sharded":
        tab.add_row("checkpoints", "sharded: each rank writes its own (train.checkpoint_format)")
    t.console.print(tab)
    for note in t.notes:
        t.console.print(f"[yellow]note:[/] {note}")
