"""Run logging for training: metrics.jsonl (+ TensorBoard) and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CompileMonitor", "Metrics", "Progress"]


class Metrics:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, *, tensorboard: bool, enabled: bool = True) -> None:
        self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, console: Any, *, enabled: bool, total: int, start: int) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self.bar = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)

    def log(self, line: str) -> None:
        (self.bar.console if self.bar is not None else self.console).print(line)


class CompileMonitor:
    """What ``torch.compile`` did while training, from dynamo's counters: graph breaks (each
    splits the step into separately compiled pieces with Python in between; counted when a
    function is traced, not per step) and recompile-limit hits (dynamo then runs that code
    eagerly from there on: the slow path, otherwise silent).

    ``check()`` returns one line per new kind of event since the last call (reasons shortened),
    so the trainer can say each once, loudly; ``counts()`` gives the totals for the metrics.
    """

    def __init__(self) -> None:
        self._base_breaks, self._base_limits = self._raw()
        self._said: set[str] = set()

    @staticmethod
    def _raw() -> tuple[dict[str, int], dict[str, int]]:
        from torch._dynamo.utils import counters

        breaks = dict(counters.get("graph_break", {}))
        limits = {k: v for k, v in counters.get("unimplemented", {}).items()
                  if "recompile limit" in k or "recompile_limit" in k or "cache_size_limit" in k}
        return breaks, limits

    def _new(self) -> tuple[dict[str, int], dict[str, int]]:
        breaks, limits = self._raw()
        return ({k: v - self._base_breaks.get(k, 0) for k, v in breaks.items() if v > self._base_breaks.get(k, 0)},
                {k: v - self._base_limits.get(k, 0) for k, v in limits.items() if v > self._base_limits.get(k, 0)})

    def counts(self) -> dict[str, int]:
        breaks, limits = self._new()
        return {"graph_breaks": sum(breaks.values()), "recompile_limit_hits": sum(limits.values())}

    def check(self) -> list[str]:
        breaks, limits = self._new()
        lines = []
        for kind, found in (("graph break", breaks), ("recompile limit hit: this code now runs eagerly", limits)):
            for reason in found:
                if reason in self._said:
                    continue
                self._said.add(reason)
                first = next((ln.strip() for ln in reason.splitlines() if ln.strip()), reason)[:160]
                lines.append(f"torch.compile {kind}: {first}")
        return lines
