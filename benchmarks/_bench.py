"""Shared timing helpers for the GPU benchmarks: CUDA events, warm-up, interleaving, medians,
per-candidate failure capture, markdown tables, and a torch.compile watchdog.

Timing model: every candidate is a zero-argument callable doing one full unit of work (e.g.
forward + backward). ``time_interleaved`` warms each one up, then runs rounds in which every
surviving candidate runs once (A, B, C, A, B, C, ...) so clock/thermal drift hits all alike;
on CUDA each call is bracketed by CUDA events (no host sync inside a round), on CPU by
``perf_counter``. A candidate that raises (OOM, unsupported kernel, ...) is recorded with its
error and dropped; the others carry on.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


@dataclass
class Result:
    name: str
    times_ms: list[float] = field(default_factory=list)
    error: str | None = None
    peak_mb: float | None = None

    @property
    def ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 3,
    iters: int = 20,
    verbose: bool = True,
) -> dict[str, Result]:
    """Median ms per call of each candidate, interleaved; failures are caught per candidate."""
    results = {k: Result(k) for k in fns}
    alive: list[str] = []
    for name, fn in fns.items():  # warm-up (and compilation), one candidate at a time
        t0 = time.perf_counter()
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(warmup):
                fn()
            sync(device)
            if device.type == "cuda":
                results[name].peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            alive.append(name)
            if verbose:
                print(f"  warmed up {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing candidate must not sink the table
            results[name].error = short_error(e)
            if verbose:
                print(f"  FAILED {name}: {results[name].error}", flush=True)
                traceback.print_exc(limit=3)
            _free(device)
    for _ in range(iters):
        events: list[tuple[str, object, object]] = []
        for name in list(alive):
            try:
                if device.type == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fns[name]()
                    b.record()
                    events.append((name, a, b))
                else:
                    t0 = time.perf_counter()
                    fns[name]()
                    results[name].times_ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                results[name].error = short_error(e)
                alive.remove(name)
                _free(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for name, a, b in events:
                results[name].times_ms.append(a.elapsed_time(b))
    return results


def kernel_times(fn: Callable[[], object], n: int = 1) -> list[tuple[float, int, str]]:
    """The GPU kernels of ``n`` calls of ``fn`` (torch.profiler): (ms per call, launches per call,
    kernel name), slowest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = [(e.self_device_time_total / n / 1e3, e.count // n, e.key) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[0])


def kernel_groups(rows: list[tuple[float, int, str]], kinds) -> dict[str, float]:
    """``kernel_times`` rows summed by group: ``kinds`` is ((group, substrings of lower-case kernel
    names), ...), the first match wins, the rest is "other"."""
    groups: dict[str, float] = {}
    for ms, _, key in rows:
        name = key.lower()
        kind = next((g for g, keys in kinds if any(k in name for k in keys)), "other")
        groups[kind] = groups.get(kind, 0.0) + ms
    return groups


def table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column ('l' or 'r')."""
    align = align or "l" + "r" * (len(headers) - 1)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


class CompileWatch(logging.Handler):
    """Counts what torch.compile does: graphs compiled, graph breaks, recompile-limit hits
    (dynamo then silently runs the function eagerly: the slow path). "recompiles" counts only
    "Recompiling function" log lines if someone enabled TORCH_LOGS=recompiles; compare
    ``graphs`` before/after a phase to see compilation happening.

    Use ``with CompileWatch() as w: ...``; ``w.snapshot()`` gives the counts so far, and
    ``w.graph_breaks`` / ``w.limit_hits`` hold the messages.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.graph_breaks: list[str] = []
        self.recompiles: list[str] = []
        self.limit_hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self._seen:
            return
        self._seen.add(id(record))
        self._keep.append(record)  # keep it alive so its id is not reused
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
        if "recompile_limit" in msg or "cache_size_limit" in msg:
            self.limit_hits.append(first)
        elif "Graph break" in msg or "graph break" in msg:
            self.graph_breaks.append(first)
        elif "Recompiling function" in msg:
            self.recompiles.append(first)

    def __enter__(self) -> CompileWatch:
        try:
            torch._logging.set_logs(graph_breaks=True)  # (recompiles=True would dump every guard)
        except Exception:  # noqa: BLE001 - older torch: the limit warning still arrives
            pass
        # torch._logging stops propagation below "torch": listen on every torch logger (deduped)
        names = ["torch", "torch._dynamo", "torch._dynamo.convert_frame", "torch._dynamo.symbolic_convert"]
        names += [n for n in logging.root.manager.loggerDict if n.startswith("torch")]
        self._loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
        self._seen: set[int] = set()
        self._keep: list[logging.LogRecord] = []
        for lg in self._loggers:
            lg.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg in self._loggers:
            lg.removeHandler(self)
        try:
            torch._logging.set_logs()
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def unique_graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @staticmethod
    def resumes() -> int:
        """Resume functions dynamo generated: one per graph break inside a compiled frame."""
        from torch._dynamo.utils import counters

        return int(sum(counters["resumes"].values()))

    def snapshot(self) -> dict[str, int]:
        return {
            "graphs": self.unique_graphs(),
            "graph_breaks": max(len(self.graph_breaks), self.resumes()),
            "recompiles": len(self.recompiles),
            "limit_hits": len(self.limit_hits),
        }
