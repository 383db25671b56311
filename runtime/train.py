"""The training loop.

    result = train("blueprints/baby-gpt.yaml", steps=2000, out_dir="runs/baby")

The blueprint's ``train:`` section gives the defaults; arguments override them. Each step
draws ``accumulate`` micro-batches of random windows, adds the blueprint's weighted auxiliary
losses to the cross-entropy, clips the gradient and takes one AdamW step at ``lr_at(step)``.
Every ``eval_every`` steps the mean loss over ``eval_iters`` validation batches is measured (the
same windows each time, so evaluations compare); ``last`` is saved every ``save_every`` steps
and at the end, ``best`` whenever the validation loss improves.

``Trainer`` keeps model construction, the step, evaluation and checkpointing in separate
methods so that growth and early-exit training can subclass it (and rebuild the model mid-run:
call ``set_model``). Resuming restores weights, optimizer, step, the batcher and the RNGs: the
same seed gives bit-identical weights on CPU whether or not the run was interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from rich.markup import escape
from torch.nn import functional as F

from physlm_graph._errors import CheckpointError, Diagnostic, Loc, RuntimeDataError, TrainingError
from physlm_graph._schema import TrainConfig

from ._schedule_checks import resume_horizon, warmup_note
from .checkpoint import _read_json, checkpoint_candidates, find_checkpoint, load_weights, model_context, model_vocab, restore_optimizer, save_checkpoint
from .data import RandomWindows, TokenCache, load_text, split
from .distributed import barrier, full_state_dict, grad_sync, init_distributed, wrap_model
from .fused_head import FusedLossModule
from ._progress import CompileMonitor, Metrics, Progress
from .optim import lr_at, make_optimizer, node_components
from .tokenizers import load_tokenizer, make_tokenizer

__all__ = ["Trainer", "train", "resolve_device"]

TOKENIZER_KINDS = ("bytes", "chars")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _normalize_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    from physlm_graph._merge import parse_override

    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(o) for o in overrides)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the loop may draw from, as JSON-able lists of ints."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state().tolist(),
        "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and state.get("torch_cuda"):
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])



def vocab_overrides(doc: dict[str, Any], vocab: int, multiple: int = 1) -> tuple[dict[str, Any], list[str]]:
    """Overrides that fit a blueprint's ``params.vocab`` to a tokenizer of ``vocab`` ids, rounded up
    to ``multiple`` (``train.vocab_multiple``). Padding needs the ``logits`` output to come straight
    from a top-level ``head.lm`` node, whose ``logit_limit`` then gives the padded ids -inf logits;
    otherwise the vocabulary stays unpadded and a note says why. Returns (overrides, notes)."""
    params = doc.get("params") or {}
    if "vocab" not in params:
        return {}, []
    padded = -(-vocab // multiple) * multiple
    out_ref = str((doc.get("outputs") or {}).get("logits", "")).split(".")[0]
    head = (doc.get("nodes") or {}).get(out_ref)
    notes = []
    if padded != vocab and not (isinstance(head, dict) and head.get("use") == "head.lm"):
        notes.append(f"train.vocab_multiple {multiple} not applied: the logits do not come straight from a "
                     "top-level head.lm node, which would give the padded ids -inf logits")
        padded = vocab
    overrides: dict[str, Any] = {}
    if params["vocab"] != padded:
        overrides["params.vocab"] = padded
        why = f"the tokenizer's {vocab} ids, padded to a multiple of {multiple}" if padded != vocab \
            else "the tokenizer's vocabulary"
        notes.append(f"params.vocab set to {padded} ({why}; the blueprint said {params['vocab']})")
    if padded != vocab:
        overrides[f"nodes.{out_ref}.logit_limit"] = vocab
    return overrides, notes


class Trainer:
    """One training run. ``fit()`` runs it; the methods are the seams for subclasses."""

    def __init__(
        self,
        source: str | os.PathLike[str] | dict[str, Any],
        *,
        out_dir: str | os.PathLike[str],
        data: str | None = None,
        tokenizer: str | None = None,
        steps: int | None = None,
        overrides: dict[str, Any] | list[str] | None = None,
        resume: bool = False,
        device: str | torch.device = "auto",
        compile: bool | None = None,
        seed: int | None = None,
        progress: bool = True,
        stop_after: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        console: Any = None,
        strategy: str = "ddp",
        **train_overrides: Any,
    ) -> None:
        from rich.console import Console

        self.source = source
        self.out_dir = Path(out_dir)
        self.data_arg, self.tokenizer_arg = data, tokenizer
        self.overrides = _normalize_overrides(overrides)
        self.resume = resume
        self.dist = init_distributed()
        self.strategy = strategy
        if strategy not in ("ddp", "fsdp"):
            raise TrainingError(f"unknown strategy {strategy!r}", expected="ddp or fsdp")
        self.device = resolve_device(device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.show_progress = progress
        self.stop_after = stop_after
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out_dir / "cache"
        self.console = console or Console(quiet=not self.dist.main)
        self.notes: list[str] = []
        updates = {"steps": steps, "compile": compile, "seed": seed, **train_overrides}
        self.updates = {k: v for k, v in updates.items() if v is not None}
        self.step = 0
        self.tokens_seen = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.skipped = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------ configuration
    def resolve_config(self) -> TrainConfig:
        """The blueprint's train section with this run's overrides applied."""
        from physlm_graph._compile import compile_blueprint

        self.base = compile_blueprint(self.source, overrides=self.overrides, build=False)
        unknown = sorted(set(self.updates) - set(TrainConfig.model_fields))
        if unknown:
            raise TrainingError(f"unknown training option(s): {', '.join(unknown)}",
                                fix=f"use {', '.join(TrainConfig.model_fields)}")
        try:
            cfg = TrainConfig.model_validate({**self.base.train_config.model_dump(), **self.updates})
        except ValidationError as err:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise TrainingError(f"invalid training option: {msgs}") from None
        return cfg

    def _blueprint_dir(self) -> Path | None:
        src = self.source
        if isinstance(src, (str, os.PathLike)) and "\n" not in str(src) and Path(src).is_file():
            return Path(src).resolve().parent
        return None

    def data_path(self) -> str:
        """``--data`` as given (relative to the working folder), else ``train.data`` relative to
        the blueprint file."""
        if self.data_arg is not None:
            return str(self.data_arg)
        if self.resume_from_path is not None:  # the text the resumed run trained on
            saved = _read_json(self.resume_from_path / "trainer_state.json").get("data")
            if saved:
                return str(saved)
        spec = self.cfg.data
        if spec is None:
            raise TrainingError("no training data", loc=Loc(file=str(self.source) if self._blueprint_dir() else "<blueprint>"),
                                fix="pass --data PATH, or set train.data in the blueprint")
        base = self._blueprint_dir()
        if spec.startswith("hf:") or Path(spec).expanduser().is_absolute() or base is None:
            return spec
        if not (base / spec).exists() and Path(spec).exists():
            self.notes.append(f"train.data {spec!r} is not found next to the blueprint; using it relative to the "
                              "working folder")
            return spec
        return os.path.normpath(base / spec)

    def tokenizer_spec(self) -> str:
        spec = self.tokenizer_arg or self.cfg.tokenizer
        base = self._blueprint_dir()
        if self.tokenizer_arg is None and base is not None and spec not in TOKENIZER_KINDS and not spec.startswith("bpe:"):
            if (base / spec).is_dir():
                return str(base / spec)
        return spec

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        self.cfg = self.resolve_config()
        if self.strategy == "fsdp" and self.cfg.ddp_reduce_dtype != "float32":
            raise TrainingError(f"train.ddp_reduce_dtype: {self.cfg.ddp_reduce_dtype} is for DDP; FSDP2 reduce-scatters "
                                "its gradients in fp32", fix="drop train.ddp_reduce_dtype, or train with --strategy ddp")
        self.schedule_steps = self.cfg.steps  # a resumed run keeps its saved horizon (restore)
        note = warmup_note(warmup=self.cfg.warmup, steps=self.cfg.steps, lr=self.cfg.lr)
        if note:
            self.notes.append(note)
        self.resume_from_path = self.find_resume() if self.resume else None
        if not self.resume and (self.out_dir / "last").exists():
            raise TrainingError("the output folder already holds a run", loc=Loc(file=str(self.out_dir)),
                                fix="pass --resume to continue it, another --out, or delete the folder")
        self.load_data()
        self.set_model(self.build_model())
        self.optimizer = self.build_optimizer()
        # each rank samples its own windows: the data are sharded by sampling
        try:
            self.batches = RandomWindows(self.train_tokens, batch_size=self.cfg.batch_size, seq_len=self.seq_len,
                                         seed=self.cfg.seed + self.dist.rank, device=self.device)
            RandomWindows(self.val_tokens, batch_size=1, seq_len=self.seq_len, seed=0)
        except RuntimeDataError as err:  # too little text for one window: name the file
            raise RuntimeDataError([Diagnostic(d.message, loc=Loc(file=str(self.data)), fix=d.fix)
                                    for d in err.diagnostics]) from None
        torch.manual_seed(self.cfg.seed)  # dropout; the model's init used its own seed
        if self.resume_from_path is not None:
            self.restore(self.resume_from_path)

    def find_resume(self) -> Path:
        try:
            checkpoint_candidates(self.out_dir)
        except CheckpointError:
            raise CheckpointError("--resume: no checkpoint to resume (no last/ or best/ here)",
                                  loc=Loc(file=str(self.out_dir)), fix="drop --resume to start a new run") from None
        return find_checkpoint(self.out_dir, resume=True)  # a damaged last/ falls back to best/, with a warning

    def load_data(self) -> None:
        self.data = self.data_path()
        text = load_text(self.data)
        if self.resume_from_path is not None and (self.resume_from_path / "tokenizer").is_dir():
            self.tokenizer = load_tokenizer(self.resume_from_path / "tokenizer")
        else:
            self.tokenizer = make_tokenizer(self.tokenizer_spec(), train_text=text, cache_dir=self.cache_dir)
        tokens = TokenCache(self.cache_dir).tokens(text, self.tokenizer)
        self.train_tokens, self.val_tokens = split(tokens, self.cfg.val_fraction)

    def build_model(self) -> Any:
        """Compile the blueprint with the tokenizer's vocabulary; returns the CompiledModel."""
        from physlm_graph._compile import compile_blueprint

        vocab = self.tokenizer.vocab_size
        extra, notes = vocab_overrides(self.base.blueprint, vocab, self.cfg.vocab_multiple)
        overrides = {**dict(self.overrides), **extra}
        self.notes.extend(notes)
        cm = compile_blueprint(self.source, overrides=overrides, seed=self.cfg.seed, device="cpu")
        mv = model_vocab(cm)
        if mv is not None and mv < vocab:
            raise TrainingError(
                f"the tokenizer has {vocab} tokens but the model's logits cover {mv}",
                loc=Loc(file=str(self.source) if self._blueprint_dir() else "<blueprint>"),
                fix=f"add `vocab: {vocab}` to params and use ${{vocab}} in the embedding and head, or --set the "
                "vocab_size of both",
            )
        return cm

    def set_model(self, cm: Any) -> None:
        """Install a (re)built model; a growth subclass calls this mid-run, then rebuilds the optimizer."""
        self.cm = cm
        self.model = cm.module.to(self.device)
        self.model.train()
        blocks = [p for paths in cm.resolved.instances.values() for p in paths]
        use_bf16 = self.cfg.dtype == "bfloat16" or (
            self.cfg.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        compile_ = functools.partial(torch.compile, mode=None if self.cfg.compile_mode == "default" else self.cfg.compile_mode)
        split = self._fused_split()
        if split is None:  # FSDP2 under bf16: gather bf16 weights (half the traffic), reduce gradients in fp32
            self.wrapped = wrap_model(self.model, self.dist, self.strategy, blocks,
                                      bucket_mb=self.cfg.ddp_bucket_mb, bucket_view=self.cfg.ddp_bucket_view,
                                      param_dtype=torch.bfloat16 if use_bf16 else None,
                                      reduce_dtype=self.cfg.ddp_reduce_dtype)
            self.forward = compile_(self.wrapped) if self.cfg.compile else self.wrapped

            def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                return self.compute_loss(self.wrapped(x), y)
        else:
            # the training module computes the loss inside its forward (so DDP sees the head's use);
            # evaluation and generation keep the original module, which shares every parameter
            self.wrapped = wrap_model(FusedLossModule(*split), self.dist, self.strategy, blocks,
                                      bucket_mb=self.cfg.ddp_bucket_mb, bucket_view=self.cfg.ddp_bucket_view,
                                      reduce_dtype=self.cfg.ddp_reduce_dtype)
            self.forward = compile_(self.model) if self.cfg.compile else self.model

            def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                ce, out = self.wrapped(x, y)
                return self.compute_loss(out, y, ce=ce)

        self.fused_loss = split is not None
        # with compile, the loss joins the compiled region: the log-softmax fuses into the head's
        # output instead of materialising fp32 logits (GPT-2 on an H100: 31.5% -> 41.7% MFU)
        self.forward_loss = compile_(forward_loss) if self.cfg.compile else forward_loss
        ctx = model_context(cm)
        self.seq_len = self.cfg.seq_len or ctx
        if self.seq_len is None:
            raise TrainingError("no sequence length: the blueprint has no context param and train.seq_len is unset",
                                fix="pass --set train.seq_len=N")
        if ctx is not None and self.seq_len > ctx:
            raise TrainingError(f"seq_len {self.seq_len} is longer than the model's context {ctx}",
                                fix=f"use seq_len <= {ctx}, or raise the context param")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        self.dtype_name = "bfloat16 autocast" if use_bf16 else "float32"

    def _fsdp_label(self) -> str:
        """How FSDP2 moves weights: the all-gather dtype the shards were wrapped with; for DDP,
        a bf16 gradient all-reduce."""
        if self.strategy != "fsdp":
            return ", bf16 gradient all-reduce" if self.cfg.ddp_reduce_dtype == "bfloat16" else ""
        # read back from FSDP2's own state (private; if a torch release moves it, say nothing)
        get_state = getattr(self.model, "_get_fsdp_state", None)
        policy = getattr(get_state(), "_mp_policy", None) if callable(get_state) else None
        if policy is None:
            return ""
        dtype = policy.param_dtype or torch.float32
        return f", {str(dtype).removeprefix('torch.')} all-gathers"

    def _compile_label(self) -> str:
        mode = self.cfg.compile_mode
        return ", torch.compile" + ("" if mode == "default" else f" {mode}")

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        return make_optimizer(self.model, lr=c.lr, weight_decay=c.weight_decay, betas=c.betas, owners=node_components(self.cm))

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks."""
        return self.cfg.batch_size * self.seq_len * self.cfg.accumulate * self.dist.world

    def describe(self) -> None:
        """Print what the run will do before it starts."""
        from rich.table import Table

        c = self.cfg
        t = Table(title=f"train {self.cm.name}", show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column()
        t.add_row("model", f"{self.cm.name} (hash {self.cm.hash})")
        t.add_row("params", f"{self.cm.num_params:,}")
        t.add_row("FLOPs/token", f"{self.cm.flops_per_token:,.0f}")
        t.add_row("tokens/step", f"{self.tokens_per_step:,} (batch {c.batch_size} x seq {self.seq_len} x accumulate {c.accumulate})")
        t.add_row("steps", f"{c.steps:,}" + (f" (resuming at {self.step:,})" if self.step else ""))
        t.add_row("total tokens", f"{c.steps * self.tokens_per_step:,}")
        t.add_row("optimizer", f"AdamW lr {c.lr:g} -> {c.min_lr if c.min_lr is not None else c.lr / 10:g} ({c.schedule}, "
                  f"warmup {c.warmup}), wd {c.weight_decay:g}, clip {c.grad_clip:g}")
        t.add_row("device", f"{self.device} ({self.dtype_name}{self._compile_label() if c.compile else ''})"
                  + (f", {self.dist.world} processes ({self.strategy}{self._fsdp_label()})" if self.dist.enabled else ""))
        t.add_row("loss", "fused head + cross-entropy (train.fused_loss)" if self.fused_loss else "cross-entropy on the logits")
        t.add_row("data", f"{self.data} ({len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens)")
        t.add_row("tokenizer", f"{self.tokenizer.name} ({self.tokenizer.vocab_size:,} tokens)")
        t.add_row("output", str(self.out_dir) + (f" (resumed from {self.resume_from_path})" if self.resume_from_path else ""))
        self.console.print(t)
        for note in self.notes:
            self.console.print(f"[yellow]note:[/] {note}")

    # ------------------------------------------------------------ the step
    def lr_at(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, lr=c.lr, min_lr=c.min_lr, warmup=c.warmup, steps=self.schedule_steps, schedule=c.schedule)

    def _fused_split(self) -> tuple[Any, Any] | None:
        """The model split into body and head for the fused head + loss, or None (train.fused_loss)."""
        from .fused_head import split_lm_head

        mode = self.cfg.fused_loss
        if mode is False:
            return None
        if self.dist.enabled and self.strategy == "fsdp":
            why = "FSDP2 shards the head with the root module; the fused loss runs under DDP or on one device"
        else:
            from physlm_graph.components.head._linear_ce import triton_available

            split = split_lm_head(self.model)
            why = split if isinstance(split, str) else None
            if why is None and mode == "auto" and not (self.cfg.compile and self.device.type == "cuda" and triton_available):
                return None  # auto: only where it is measured to pay (compiled, CUDA, triton)
            if why is None:
                return split
        if mode is True:
            raise TrainingError(f"train.fused_loss is true but {why}", fix="set train.fused_loss: auto or false")
        return None

    def compute_loss(self, out: dict[str, Any], y: torch.Tensor,
                     ce: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE(logits, y) + sum of weight * aux (+ the weighted exit losses, each logged as
        ``exit.<point>``); returns the total and each unweighted term. ``ce``: the cross-entropy
        already computed by the fused head + loss (``out`` then has no logits)."""
        if ce is None:
            logits = out["logits"]
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100)
        total, parts = ce, {"ce": ce}
        for name, term in (out.get("aux") or {}).items():
            parts[name] = term
            total = total + self.cm.loss_weights.get(name, 1.0) * term
        if out.get("exit_logits"):  # the blueprint declares exits (runtime/early_exit.py)
            from .early_exit import exit_losses

            extra, terms = exit_losses(self.cm, out, y)
            total = total + extra
            parts.update(terms)
        return total, parts

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (``step`` is 0-based); returns its metrics."""
        c = self.cfg
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum: dict[str, torch.Tensor] = {}
        for i in range(c.accumulate):
            x, y = next(self.batches)
            if c.compile and c.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-step's graph outputs are done with
            with grad_sync(self.wrapped, self.dist, self.strategy, last=i == c.accumulate - 1):
                with self.autocast():
                    loss, parts = self.forward_loss(x, y)
                (loss / c.accumulate).backward()
            loss_sum += loss.detach() / c.accumulate
            for k, v in parts.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v.detach().float() / c.accumulate
        self.tokens_seen += self.tokens_per_step
        if self.deferred():
            return self._deferred_step(step, lr, loss_sum, aux_sum)
        loss_val = float(loss_sum)
        finite = math.isfinite(loss_val)
        gnorm = None
        if finite and c.grad_clip > 0:
            gnorm = float(self.clip_gradients())
            finite = math.isfinite(gnorm)
        record: dict[str, Any] = {"step": step + 1, "loss": loss_val, "lr": lr}
        record.update({k: float(v) for k, v in aux_sum.items() if k != "ce"})
        if gnorm is not None:
            record["grad_norm"] = gnorm
        if not finite:
            self.optimizer.grad_scale = None
            self.on_nonfinite(step + 1, loss_val, gnorm)
            record["skipped"] = True
            return record
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = None
        return record

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients' global 2-norm to ``train.grad_clip``; returns the norm before clipping.

        With a fused AdamW the clipping rides in the optimizer's kernel: its ``grad_scale`` divides
        every gradient by max(1, (norm + 1e-6) / grad_clip), which is ``clip_grad_norm_``'s factor
        (up to the rounding of a division against a product), and writes the clipped gradient back
        as it goes. The separate pass that scales the gradients in place does not run, nor do its
        launches (GPT-2 124M on an H100: the trainer went from 0.977 to 0.990-0.993 of the bare
        compiled step's tokens/s, ``benchmarks/trainer_profile.py``). Other optimizers, and FSDP2's
        sharded gradients, take ``clip_grad_norm_``."""
        c = self.cfg
        get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        if get_total_norm is None or self.strategy == "fsdp" or not self._fused_optimizer():
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = get_total_norm(grads)
        self.optimizer.grad_scale = torch.clamp((norm + 1e-6) / c.grad_clip, min=1.0).float()
        return norm

    def _fused_optimizer(self) -> bool:
        return bool(self.optimizer.param_groups) and all(g.get("fused") for g in self.optimizer.param_groups)

    def deferred(self) -> bool:
        """Whether steps run without a host synchronisation: with the fused AdamW (on CUDA) a
        non-finite step is skipped on the device (the kernel's ``found_inf``), and the loss, the
        gradient norm and the non-finite steps reach the host only when ``resolve`` is called
        (at log, evaluation and save steps). FSDP2 keeps the synchronous path, and so does
        ``PHYSLM_SYNC_STEPS=1`` in the environment (every step checked at once, as before)."""
        if os.environ.get("PHYSLM_SYNC_STEPS", "0") == "1" or self.strategy == "fsdp":
            return False
        return self._fused_optimizer()

    def _deferred_step(self, step: int, lr: float, loss_sum: torch.Tensor,
                       aux_sum: dict[str, torch.Tensor]) -> dict[str, Any]:
        c = self.cfg
        bad = ~torch.isfinite(loss_sum)
        gnorm = None
        if c.grad_clip > 0:
            gnorm = self.clip_gradients()
            bad = bad | ~torch.isfinite(gnorm)
        self.optimizer.found_inf = bad.float()  # the fused kernel leaves weights, moments and step as they were
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = self.optimizer.grad_scale = None
        w = self._watch_state()
        first = bad & (w["n"] == 0)
        w["n"] += bad.long()
        over = bad & (w["limit_step"] < 0) & (self.skipped + w["n"] > c.max_skips)
        for tag, hit in (("first", first), ("limit", over)):
            w[f"{tag}_step"] = torch.where(hit, step + 1, w[f"{tag}_step"])
            w[f"{tag}_loss"] = torch.where(hit, loss_sum.float(), w[f"{tag}_loss"])
            if gnorm is not None:
                w[f"{tag}_gnorm"] = torch.where(hit, gnorm.float(), w[f"{tag}_gnorm"])
        record: dict[str, Any] = {"step": step + 1, "loss": loss_sum, "lr": lr, "_bad": bad}
        record.update({k: v for k, v in aux_sum.items() if k != "ce"})
        if gnorm is not None:
            record["grad_norm"] = gnorm
        return record

    def _watch_state(self) -> dict[str, torch.Tensor]:
        """Device-side record of the non-finite steps since the last ``resolve``."""
        if getattr(self, "_watch", None) is None:
            z = torch.zeros((), device=self.device)
            self._watch = {"n": torch.zeros((), dtype=torch.long, device=self.device),
                           **{f"{t}_{k}": z.clone() - (1 if k == "step" else 0)
                              for t in ("first", "limit") for k in ("step", "loss", "gnorm")}}
        return self._watch

    def resolve(self, record: dict[str, Any]) -> dict[str, Any]:
        """A step's record with host numbers (one synchronisation), after acting on the
        non-finite steps since the last call as ``nan_policy`` says. Synchronous records pass."""
        keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]
        if not keys:
            return record
        w = self._watch_state()
        wkeys = list(w)
        vals = torch.stack([record[k].detach().float().reshape(()) for k in keys]
                           + [w[k].float() for k in wkeys]).tolist()
        out = {**record, **dict(zip(keys, vals))}
        seen = dict(zip(wkeys, vals[len(keys):]))
        if out.pop("_bad"):
            out["skipped"] = True
        n = int(seen["n"])
        if n:
            self._watch = None
            has_gnorm = self.cfg.grad_clip > 0
            if self.cfg.nan_policy == "stop":
                raise self.nonfinite_error(int(seen["first_step"]), seen["first_loss"],
                                           seen["first_gnorm"] if has_gnorm else None)
            self.skipped += n
            if self.skipped > self.cfg.max_skips:
                raise self.nonfinite_error(int(seen["limit_step"]), seen["limit_loss"],
                                           seen["limit_gnorm"] if has_gnorm else None, self.cfg.max_skips + 1)
        return out

    def nonfinite_error(self, step: int, loss: float, gnorm: float | None, skipped: int | None = None) -> TrainingError:
        """The error for a non-finite loss or gradient norm at ``step``: ``nan_policy: stop``'s
        (``skipped`` None), or the one for ``skipped`` batches, more than ``max_skips``."""
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
        kept = f"; the last good checkpoint is kept in {self.out_dir / 'last'}" if (self.out_dir / "last").exists() else ""
        if skipped is None:
            return TrainingError(f"{what} at step {step}{kept}",
                                 fix="lower lr, raise warmup, or set train.nan_policy: skip to skip such batches")
        return TrainingError(f"{what} at step {step}: {skipped} batches skipped, more than max_skips "
                             f"{self.cfg.max_skips}{kept}", fix="lower lr or raise warmup")

    def on_nonfinite(self, step: int, loss: float, gnorm: float | None) -> None:
        if self.cfg.nan_policy == "stop":
            raise self.nonfinite_error(step, loss, gnorm)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        if self.skipped > self.cfg.max_skips:
            raise self.nonfinite_error(step, loss, gnorm, self.skipped)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``eval_iters`` validation batches (the same windows every time)."""
        self.model.eval()
        batches = RandomWindows(self.val_tokens, batch_size=self.cfg.batch_size, seq_len=self.seq_len,
                                seed=self.cfg.seed + 1, device=self.device)
        total = 0.0
        for _ in range(self.cfg.eval_iters):
            x, y = next(batches)
            with self.autocast():
                logits = self.forward(x)["logits"]
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)))
        self.model.train()
        return total / self.cfg.eval_iters

    # ------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val,
            "last_val_loss": self.last_val,
            "skipped": self.skipped,
            "elapsed_s": self.elapsed,
            "growth_stage": None,
            "blueprint_hash": self.cm.hash,
            "config": self.cfg.model_dump(mode="json"),
            "data": self.data,
            "rng": rng_state(self.device),
            "batcher": self.batches.state_dict(),
        }

    def save(self, name: str) -> Path:
        """Rank 0 writes the full weights; with FSDP2 they are gathered first (every rank joins)."""
        path = self.out_dir / name
        module, optimizer = self.model, self.optimizer
        if self.dist.enabled and self.strategy == "fsdp":
            full = full_state_dict(self.model, self.strategy)
            optimizer = None  # sharded optimizer state is not gathered: a resumed FSDP run restarts the moments
            if self.dist.main:
                from physlm_graph._compile import compile_blueprint

                module = compile_blueprint(self.cm.blueprint, device="cpu").module
                module.load_state_dict(full)
        if self.dist.main:
            save_checkpoint(path, cm=self.cm, module=module, tokenizer=self.tokenizer,
                            optimizer=optimizer, trainer_state=self.trainer_state())
        barrier(self.dist)
        return path

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, step, batcher, RNGs."""
        state_path = folder / "trainer_state.json"
        if not state_path.is_file():
            raise CheckpointError("no trainer state: this checkpoint cannot be resumed", loc=Loc(file=str(state_path)),
                                  fix="start a new run from it instead")
        state = _read_json(state_path)  # a damaged file is a CheckpointError naming it
        if state.get("blueprint_hash") != self.cm.hash:
            raise CheckpointError(
                f"the checkpoint holds another model (graph {state.get('blueprint_hash')}; this run builds {self.cm.hash})",
                loc=Loc(file=str(folder)), fix="resume with the same blueprint and --set overrides, or use another --out")
        self.schedule_steps, note = resume_horizon(state, steps=self.cfg.steps, schedule=self.cfg.schedule)
        if note:
            self.notes.append(note)
        load_weights(self.model, folder)
        restore_optimizer(self.optimizer, folder)
        self.batches.load_state_dict(state["batcher"])
        set_rng_state(state["rng"], self.device)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val, self.last_val = state.get("best_val_loss"), state.get("last_val_loss")
        self.skipped, self.elapsed = state.get("skipped", 0), state.get("elapsed_s", 0.0)

    # ------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        self.setup()
        self.describe()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        save_every = c.save_every or c.eval_every
        end = min(c.steps, self.stop_after) if self.stop_after is not None else c.steps
        logger = Metrics(self.out_dir, tensorboard=True, enabled=self.dist.main)
        bar = Progress(self.console, enabled=self.show_progress and self.dist.main, total=c.steps, start=self.step)
        start_step, t_run = self.step, time.perf_counter()
        t_log, tok_log = time.perf_counter(), self.tokens_seen
        last: dict[str, Any] = {}
        shown = float("nan")  # the loss on the progress bar, as of the last resolved step
        self._watch = None
        monitor = CompileMonitor() if c.compile else None
        try:
            with bar:
                while self.step < end:
                    last = self.train_step(self.step)
                    self.step += 1
                    if monitor is not None:  # say each graph break / eager fallback once, loudly
                        for line in monitor.check():
                            bar.log(f"[bold yellow]warning:[/] {escape(line)}")
                        last.update(monitor.counts())
                    evaluated = self.step % c.eval_every == 0 or self.step == end
                    if self.step % c.log_every == 0 or evaluated or self.step % save_every == 0:
                        last = self.resolve(last)  # the only host synchronisation of a deferred step
                    if not isinstance(last["loss"], torch.Tensor):
                        shown = last["loss"]
                    now = time.perf_counter()
                    tps = (self.tokens_seen - tok_log) / max(now - t_log, 1e-9)
                    if evaluated:
                        self.last_val = last["val_loss"] = self.evaluate()
                        if self.best_val is None or self.last_val < self.best_val:
                            self.best_val = self.last_val
                            self.save("best")
                        bar.log(f"step {self.step}: train loss {last['loss']:.4f}, val loss {self.last_val:.4f}"
                                f" (best {self.best_val:.4f})")
                    if self.step % c.log_every == 0 or evaluated:
                        logger.write({**last, "tokens": self.tokens_seen, "tokens_per_s": tps})
                        t_log, tok_log = now, self.tokens_seen
                    if self.step % save_every == 0 or self.step == end:
                        self.elapsed += time.perf_counter() - t_run
                        t_run = time.perf_counter()
                        self.save("last")
                    bar.update(self.step, shown, tps)
        except KeyboardInterrupt:
            if self.step > start_step:
                self.resolve(last)  # steps not yet reported: nan_policy acts before anything is saved
                self.save("last")
            raise
        finally:
            logger.close()
        self.elapsed += time.perf_counter() - t_run
        return {
            "out_dir": str(self.out_dir),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "final_loss": last.get("loss"),
            "val_loss": self.last_val,
            "best_val_loss": self.best_val,
            "skipped": self.skipped,
            "wall_s": self.elapsed,
            "params": self.cm.num_params,
            "last": str(self.out_dir / "last"),
            "best": str(self.out_dir / "best") if (self.out_dir / "best").exists() else None,
            **({"compile": monitor.counts()} if monitor is not None else {}),
        }


def train(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    data: str | None = None,
    tokenizer: str | None = None,
    steps: int | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    device: str | torch.device = "auto",
    compile: bool | None = None,
    seed: int | None = None,
    progress: bool = True,
    strategy: str = "ddp",
    **train_overrides: Any,
) -> dict[str, Any]:
    """Train a blueprint; returns a summary (steps, tokens, losses, wall time, checkpoint paths).

    ``train_overrides`` are ``train:`` keys (``batch_size=8``, ``lr=3e-4``, ...);
    ``stop_after=N`` stops after step N of the full schedule (as if interrupted, saving ``last``).
    A blueprint with ``growth:`` stages trains with ``GrowthTrainer`` (runtime/growth.py).
    """
    from .growth import trainer_class

    cls = trainer_class(source, overrides)
    return cls(source, data=data, tokenizer=tokenizer, steps=steps, overrides=overrides, out_dir=out_dir,
               resume=resume, device=device, compile=compile, seed=seed, progress=progress, strategy=strategy,
               **train_overrides).fit()
