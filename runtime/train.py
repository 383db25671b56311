"""The training loop.

    result = train("blueprints/baby-gpt.yaml", steps=2000, out_dir="runs/baby")

The blueprint's ``train:`` section gives the defaults; arguments override them. The blueprint is
read once into a run plan (``runtime/plan.py``); the trainer follows it. Each step draws
``accumulate`` micro-batches of random windows, optimizes the plan's objective (the final
cross-entropy plus the weighted auxiliary and exit losses, ``runtime/objective.py``), clips the
gradient and takes one optimizer step (AdamW, or ``train.optimizers``' groups) at the schedule's
learning rate. Every ``eval_every`` steps the mean final
cross-entropy over ``eval_iters`` validation batches is measured (the same windows each time, so
evaluations compare); ``last`` is saved every ``save_every`` steps and at the end, ``best``
whenever the validation loss improves.

The trainer holds its features as parts: the objective, the non-finite guard
(``runtime/guard.py``), the checkpoint cadence and Ctrl-C handling (``runtime/cadence.py``), and
growth (``runtime/growth_part.py``) whenever the plan has growth stages; parts with step hooks
follow ``runtime/parts.py``. Resuming restores weights, optimizer, step, the batcher, the RNGs
and each part's state: the same seed gives bit-identical weights on CPU whether or not the run
was interrupted (by Ctrl-C or a kill).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch.nn import functional as F

from physlm_graph._errors import CheckpointError, Diagnostic, Loc, RuntimeDataError, TrainingError

from ._progress import CompileMonitor, Metrics, Progress
from .cadence import CheckpointCadence, Interrupts, read_state, restore_run, rng_state, save_run, set_rng_state, trainer_state
from ._schedule_checks import warmup_note
from .checkpoint import checkpoint_candidates, find_checkpoint
from .data import RandomWindows, TokenCache, load_text, passes_note, split, train_batches
from .distributed import grad_sync, init_distributed
from .growth_part import GrowthPart
from .guard import NonFiniteGuard
from .init_from import InitFrom, carry_weights
from .model_setup import install_model
from .objective import OBJECTIVE, Objective
from .optim import make_optimizer, node_components
from .parts import Part
from .plan import RunPlan, make_plan, normalize_overrides, vocab_overrides
from .step import clip_gradients, deferred, group_optimizers, optimizer_step, scheduled_lr, set_lr
from .summary import describe_run

__all__ = ["Trainer", "train", "resolve_device", "vocab_overrides", "rng_state", "set_rng_state"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Trainer:
    """One training run of a plan. ``fit()`` runs it.

    ``source`` is a blueprint (path, YAML text or dict) read once into a ``RunPlan`` with
    ``overrides`` and the training options (``steps``, ``compile``, ``seed`` and any ``train:``
    key), or a ``RunPlan`` already made (then those options must not be given again).
    ``check_growth``: check that function-preserving growth keeps the logits (growth part).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | dict[str, Any] | RunPlan,
        *,
        out_dir: str | os.PathLike[str],
        data: str | None = None,
        tokenizer: str | None = None,
        steps: int | None = None,
        overrides: dict[str, Any] | list[str] | None = None,
        resume: bool = False,
        device: str | torch.device = "auto",
        compile: bool | str | None = None,
        seed: int | None = None,
        progress: bool = True,
        stop_after: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        console: Any = None,
        strategy: str = "ddp",
        check_growth: bool = True,
        init_from: str | os.PathLike[str] | None = None,
        **train_overrides: Any,
    ) -> None:
        from rich.console import Console

        self.source = source
        self.out_dir = Path(out_dir)
        self.init_from = InitFrom(init_from, resume=resume) if init_from is not None else None  # runtime/init_from.py
        self.data_arg, self.tokenizer_arg = data, tokenizer or (self.init_from and self.init_from.tokenizer)
        self.overrides = normalize_overrides(overrides)
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
        self.check_growth = check_growth
        self.notes: list[str] = []
        updates = {"steps": steps, "compile": compile, "seed": seed, **train_overrides}
        self.updates = {k: v for k, v in updates.items() if v is not None}
        if isinstance(source, RunPlan) and (self.updates or self.overrides):
            raise TrainingError("a RunPlan already holds the overrides and training options",
                                fix="pass them to make_plan, or pass the blueprint instead of the plan")
        self.step = 0
        self.tokens_seen = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.elapsed = 0.0
        self.growth: GrowthPart | None = None
        self.parts: list[Part] = []

    # ------------------------------------------------------------ the plan and its parts
    def make_plan(self) -> RunPlan:
        if isinstance(self.source, RunPlan):
            return self.source
        return make_plan(self.source, overrides=self.overrides, **self.updates)

    def check_ddp_settings(self) -> None:
        """``train.ddp_*`` set DDP's gradient all-reduce: under FSDP2 (which reduce-scatters its
        shards in fp32, in its own buckets) they are an error at the key; in a run of one process
        (no all-reduce at all) a note says they have no effect."""
        c, fields = self.cfg, type(self.cfg).model_fields
        keys = ("ddp_reduce_dtype", "ddp_bucket_mb", "ddp_bucket_view")
        given = [k for k in keys if getattr(c, k) != fields[k].default]
        if not given:
            return
        if self.strategy == "fsdp":
            doc = self.plan.compiled.resolved.doc
            loc = (doc.loc(("train", given[0])) if doc is not None else None) or self.plan.where
            what = {"ddp_reduce_dtype": f"{c.ddp_reduce_dtype} is for DDP; FSDP2 reduce-scatters its gradients in fp32",
                    "ddp_bucket_mb": f"{c.ddp_bucket_mb:g} sizes DDP's gradient buckets; FSDP2 has none",
                    "ddp_bucket_view": f"{c.ddp_bucket_view} is DDP's gradient_as_bucket_view; FSDP2 has no buckets"}
            raise TrainingError(f"train.{given[0]}: {what[given[0]]}", loc=loc,
                                fix=f"drop train.{given[0]}, or train with --strategy ddp")
        if not self.dist.enabled:
            self.notes.append(f"train.{', train.'.join(given)} {'has' if len(given) == 1 else 'have'} no effect: the "
                              "run is one process, with no gradient all-reduce (they apply under torchrun with DDP)")

    @property
    def skipped(self) -> int:
        return self.guard.skipped

    def setup(self) -> None:
        self.plan = self.make_plan()
        self.cfg = self.plan.config
        self.check_ddp_settings()
        if self.plan.stages and self.dist.enabled and self.strategy == "fsdp":
            from physlm_graph._growth_ops import GrowthError

            raise GrowthError("growth under FSDP is not supported: the sharded weights cannot be copied into the "
                              "grown model", fix="train growth schedules with --strategy ddp (the default)")
        self.objective = Objective(self.plan.loss_weights, reduction=self.cfg.loss_reduction,
                                   accumulate=self.cfg.accumulate, world=self.dist.world)
        self.guard = NonFiniteGuard(self.cfg, self.device, self.out_dir)
        self.cadence = CheckpointCadence(self.cfg, self.stop_after)
        self.growth = GrowthPart(self.plan.stages, check=self.check_growth) if self.plan.stages else None
        self.parts = [p for p in (self.growth,) if p is not None]
        self.schedule_steps = self.cfg.steps  # a resumed run keeps its saved horizon (restore_run)
        note = warmup_note(warmup=self.cfg.warmup, steps=self.cfg.steps, lr=self.cfg.lr)
        if note:
            self.notes.append(note)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TrainingError("the output exists and is a file, not a run folder", loc=Loc(file=str(self.out_dir)),
                                fix="pass another --out (a new or run folder)")
        self.resume_from_path = self.find_resume() if self.resume else None
        if not self.resume and (self.out_dir / "last").exists():
            raise TrainingError("the output folder already holds a run", loc=Loc(file=str(self.out_dir)),
                                fix="pass --resume to continue it, another --out, or delete the folder")
        state = read_state(self.resume_from_path) if self.resume_from_path is not None else None
        if state is not None:
            for part in self.parts:
                part.load_state(state)
        self.load_data()
        self.set_model(carry_weights(self, self.build_model()))  # --init-from: after the blueprint's init
        if self.growth is not None:
            self.growth.check_reached(self)  # a stage past the last step: refused before step 0
        self.optimizer = self.build_optimizer()
        try:
            self.batches = self.make_batches()
            RandomWindows(self.val_tokens, batch_size=1, seq_len=self.seq_len, seed=0)
            if self.cfg.data_order == "sequential":
                self.notes.extend(passes_note(self.batches, self.cfg.steps * self.cfg.accumulate))
        except RuntimeDataError as err:  # too little text for one window: name the file
            raise RuntimeDataError([Diagnostic(d.message, loc=Loc(file=str(self.data)), fix=d.fix)
                                    for d in err.diagnostics]) from None
        torch.manual_seed(self.cfg.seed)  # dropout; the model's init used its own seed
        if state is not None:
            self.restore(self.resume_from_path, state)

    def make_batches(self) -> Any:
        """This rank's training batches from the start, as ``train.data_order`` says (random windows,
        each rank its own seed; or in order, each rank its own slice): what ``fit`` reads."""
        c = self.cfg
        return train_batches(self.train_tokens, order=c.data_order, batch_size=c.batch_size, seq_len=self.seq_len,
                             seed=c.seed, rank=self.dist.rank, world=self.dist.world, device=self.device)

    def find_resume(self) -> Path:
        try:
            checkpoint_candidates(self.out_dir)
        except CheckpointError:
            raise CheckpointError("--resume: no checkpoint to resume (no last/ or best/ here)",
                                  loc=Loc(file=str(self.out_dir)), fix="drop --resume to start a new run") from None
        return find_checkpoint(self.out_dir, resume=True)  # a damaged last/ falls back to best/, with a warning

    def load_data(self) -> None:
        from .tokenizers import load_tokenizer, make_tokenizer

        saved = None
        if self.data_arg is None and self.resume_from_path is not None:  # the text the resumed run trained on
            saved = (read_state(self.resume_from_path) or {}).get("data")
        self.data = self.plan.data_path(self.data_arg if saved is None else str(saved))
        text = load_text(self.data)
        if self.resume_from_path is not None and (self.resume_from_path / "tokenizer").is_dir():
            self.tokenizer = load_tokenizer(self.resume_from_path / "tokenizer")
        else:
            self.tokenizer = make_tokenizer(self.plan.tokenizer_spec(self.tokenizer_arg), train_text=text,
                                            cache_dir=self.cache_dir)
        tokens = TokenCache(self.cache_dir).tokens(text, self.tokenizer)
        self.train_tokens, self.val_tokens = split(tokens, self.cfg.val_fraction)

    def build_model(self) -> Any:
        """The plan's model for the tokenizer's vocabulary, at the growth stage the run is in."""
        cm, notes = self.plan.model(vocab=self.tokenizer.vocab_size, tokenizer=self.tokenizer.name,
                                    stage=self.growth.stage if self.growth is not None else None)
        self.notes.extend(self.plan.notes + notes)
        return cm

    def set_model(self, cm: Any) -> None:
        """Install a (re)built model: placed, wrapped for DDP/FSDP2, compiled as ``train.compile``
        says (``runtime/model_setup.py``); the growth part calls this mid-run, then rebuilds the
        optimizer."""
        install_model(self, cm)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over every parameter, or ``train.optimizers``' groups (``runtime/step.py``)."""
        c = self.cfg
        if c.optimizers is not None:
            return group_optimizers(self)
        return make_optimizer(self.model, lr=c.lr, weight_decay=c.weight_decay, betas=c.betas, owners=node_components(self.cm))

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks."""
        return self.cfg.batch_size * self.seq_len * self.cfg.accumulate * self.dist.world

    def describe(self) -> None:
        """Print what the run will do before it starts."""
        describe_run(self)

    # ------------------------------------------------------------ the step
    def lr_at(self, step: int) -> float:
        """The schedule's learning rate at ``step``, times each part's factor (growth's re-warmup)."""
        lr = scheduled_lr(self.cfg, step, self.schedule_steps)  # with train.optimizers: the factor on each group's lr
        for part in self.parts:
            scale = part.lr_scale(step)
            if scale != 1.0:
                lr *= scale
        return lr

    def compute_loss(self, out: dict[str, Any], y: torch.Tensor,
                     ce: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's total and its named terms (``loss``: the final cross-entropy)."""
        return self.objective(self.cm, out, y, ce=ce)

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (``step`` is 0-based); returns its metrics."""
        self._in_step = True  # from here until the loop has finished the step, a saved state would not resume exactly
        for part in self.parts:
            part.before_step(self, step)
        c = self.cfg
        lr = self.lr_at(step)
        set_lr(self, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i in range(c.accumulate):
            x, y = next(self.batches)
            if c.compile == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-step's graph outputs are done with
            with grad_sync(self.wrapped, self.dist, self.strategy, last=i == c.accumulate - 1):
                with self.autocast():
                    loss, parts = self.forward_loss(x, y)
                self.objective.micro_loss(loss, y).backward()
            loss_sum += loss.detach() / c.accumulate
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / c.accumulate
        self.tokens_seen += self.tokens_per_step
        record: dict[str, Any] = {"step": step + 1, **terms, OBJECTIVE: loss_sum, "lr": lr}
        optimizer_step(self, step, loss_sum, record)
        for part in self.parts:
            part.after_step(record)
        return record

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to ``train.grad_clip``; the norm before clipping (``runtime/step.py``)."""
        return clip_gradients(self)

    def deferred(self) -> bool:
        """Whether steps run without a host synchronisation (``runtime/step.py``)."""
        return deferred(self)

    def resolve(self, record: dict[str, Any]) -> dict[str, Any]:
        """A step's record with host numbers (see ``NonFiniteGuard.resolve``)."""
        return self.guard.resolve(record)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean final cross-entropy over ``eval_iters`` validation batches (the same windows every time)."""
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

    # ------------------------------------------------------------ checkpoints (runtime/cadence.py)
    def trainer_state(self) -> dict[str, Any]:
        return trainer_state(self)

    def save(self, name: str) -> Path:
        """Save ``OUT/name`` (rank 0 writes; with FSDP2 every rank joins the gather)."""
        return save_run(self, name)

    def restore(self, folder: Path, state: dict[str, Any] | None = None) -> None:
        """Continue from a checkpoint: weights, optimizer, step, batcher, RNGs, the parts' state."""
        restore_run(self, folder, read_state(folder) if state is None else state)

    # ------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        self.setup()
        self.describe()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        c, cad = self.cfg, self.cadence
        end = cad.end
        logger = Metrics(self.out_dir, tensorboard=True, enabled=self.dist.main)
        bar = Progress(self.console, enabled=self.show_progress and self.dist.main, total=c.steps, start=self.step)
        start_step, t_run = self.step, time.perf_counter()
        t_log, tok_log = time.perf_counter(), self.tokens_seen
        last: dict[str, Any] = {}
        shown = float("nan")  # the loss on the progress bar, as of the last resolved step
        self.guard.reset()
        self._in_step = False
        monitor = CompileMonitor() if c.compile else None
        try:
            with bar, Interrupts() as interrupts:
                while self.step < end:
                    last = self.train_step(self.step)
                    self.step += 1
                    if monitor is not None:  # say each graph break / eager fallback once, loudly
                        for line in monitor.check():
                            bar.log(f"[bold yellow]warning:[/] {escape(line)}")
                        last.update(monitor.counts())
                    synced = cad.sync(self.step)
                    if synced:
                        last = self.resolve(last)  # the only host synchronisation of a deferred step
                    if not isinstance(last["loss"], torch.Tensor):
                        shown = last["loss"]
                    now = time.perf_counter()
                    tps = (self.tokens_seen - tok_log) / max(now - t_log, 1e-9)
                    if cad.evaluate(self.step):
                        self.last_val = last["val_loss"] = self.evaluate()
                        if self.best_val is None or self.last_val < self.best_val:
                            self.best_val = self.last_val
                            self.save("best")
                        bar.log(f"step {self.step}: train loss {last['loss']:.4f}, val loss {self.last_val:.4f}"
                                f" (best {self.best_val:.4f})")
                    if cad.log(self.step):
                        logger.write({**last, "tokens": self.tokens_seen, "tokens_per_s": tps, **self._peak_memory()})
                        t_log, tok_log = now, self.tokens_seen
                    if cad.save(self.step):
                        self.elapsed += time.perf_counter() - t_run
                        t_run = time.perf_counter()
                        self.save("last")
                    bar.update(self.step, shown, tps)
                    self._in_step = False
                    if (synced or not self.dist.enabled) and interrupts.agreed(self.dist, self.device):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self._in_step:  # a second Ctrl-C (or an error) inside a step: its state would not resume exactly
                self.console.print(f"[yellow]interrupted inside step {self.step + 1}: not saved; the last saved "
                                   "checkpoint stays[/]")
            elif self.step > start_step:
                self.resolve(last)  # steps not yet reported: nan_policy acts before anything is saved
                self.elapsed += time.perf_counter() - t_run
                t_run = time.perf_counter()
                if not cad.save(self.step):
                    self.save("last")
                self.console.print(f"interrupted after step {self.step}: saved {self.out_dir / 'last'}; --resume continues")
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
            "skipped": self.guard.skipped,
            "wall_s": self.elapsed,
            "params": self.cm.num_params,
            "last": str(self.out_dir / "last"),
            "best": str(self.out_dir / "best") if (self.out_dir / "best").exists() else None,
            **({"compile": monitor.counts()} if monitor is not None else {}),
            **self._peak_memory(),
        }

    def _peak_memory(self) -> dict[str, int]:
        """``peak_memory_bytes``: the most CUDA memory this process's tensors have held since the
        run began (``torch.cuda.max_memory_allocated``; under FSDP2 or DDP, the main rank's
        device); nothing on other devices."""
        if self.device.type != "cuda":
            return {}
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device))}


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
    compile: bool | str | None = None,
    seed: int | None = None,
    progress: bool = True,
    strategy: str = "ddp",
    init_from: str | os.PathLike[str] | None = None,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Train a blueprint; returns a summary (steps, tokens, losses, wall time, checkpoint paths).

    ``train_overrides`` are ``train:`` keys (``batch_size=8``, ``lr=3e-4``, ...); ``compile`` is
    False, True (the default mode) or a torch.compile mode (``"reduce-overhead"``, ...);
    ``stop_after=N`` stops after step N of the full schedule (as if interrupted, saving ``last``);
    ``check_growth=False`` accepts growth that changes the logits; ``init_from`` starts from a
    checkpoint's weights, tensor by tensor by name (``runtime/init_from.py``). Everything the blueprint
    declares (growth stages, exits, extensions, losses) is followed: the trainer is built from
    the run plan.
    """
    return Trainer(source, data=data, tokenizer=tokenizer, steps=steps, overrides=overrides, out_dir=out_dir,
                   resume=resume, device=device, compile=compile, seed=seed, progress=progress, strategy=strategy,
                   init_from=init_from, **train_overrides).fit()
