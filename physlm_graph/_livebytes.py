"""Live bytes of a training step, counted from the storages operations create.

``LiveBytes`` is what ``build --memory`` runs its meta training step under (``_memory.py``);
``measure_step`` runs a real step under it: on CPU, where no allocator keeps a peak, that is the
measurement the estimate is checked against (``tests/compiler/test_memory.py``,
``benchmarks/memory_estimate.py --smoke``). Only storages made by dispatched operations are
seen: a kernel's internal buffers and library workspaces are not.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes", "measure_step", "PHASES"]

PHASES = ("forward", "backward", "step")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of each storage an operation creates, while it lives, and the largest sum
    each phase (``self.phase``, set by the caller) reaches.

    Storages in ``existing`` (parameters, buffers, inputs, optimizer state) are not counted,
    nor created again when an in-place operation or a view hands them back. A storage is freed
    with its last tensor (a finalizer on it: PyTorch keeps one Python object per storage for as
    long as the storage lives). Any device, ``meta`` included. Storages marked ``cast`` (autocast's
    weight copies) or ``grad`` (a parameter's gradient) are summed apart as well, and each phase
    records ``[largest sum, largest sum without gradients, largest sum without either]``."""

    def __init__(self, existing: set[int] = frozenset()) -> None:
        super().__init__()
        self.existing = set(existing)
        self.live: dict[int, int] = {}  # storage -> bytes
        self.marked: dict[int, str] = {}  # storage -> "cast" | "grad"
        self.now = self.casts = self.grads = 0
        self.phase = "forward"
        self.peaks: dict[str, list[int]] = {}

    @staticmethod
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _free(self, key: int) -> None:
        n = self.live.pop(key, 0)
        self.now -= n
        kind = self.marked.pop(key, None)
        if kind == "cast":
            self.casts -= n
        elif kind == "grad":
            self.grads -= n

    def mark(self, t: torch.Tensor, kind: str) -> None:
        key = self.key(t)
        if key in self.live and key not in self.marked:
            self.marked[key] = kind
            if kind == "cast":
                self.casts += self.live[key]
            else:
                self.grads += self.live[key]
            self._record()

    def _record(self) -> None:
        p = self.peaks.setdefault(self.phase, [0, 0, 0])
        p[0] = max(p[0], self.now)
        p[1] = max(p[1], self.now - self.grads)
        p[2] = max(p[2], self.now - self.grads - self.casts)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in self.existing:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    weakref.finalize(st, self._free, key)
        self._record()
        return out

    def peak(self, phase: str, column: int = 0) -> int:
        return self.peaks.get(phase, [0, 0, 0])[column]


def measure_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor, *,
                 dtype: str = "bfloat16", steps: int = 3) -> dict[str, Any]:
    """The live bytes of a real training step (any device; on CPU, where no allocator keeps a
    peak, the check of the estimate): ``steps`` steps of fused AdamW on ``model`` as the
    benchmark runs them, autocast to bf16 unless ``dtype`` is float32, the unfused cross-entropy
    on fp32 logits, gradients set to None; the last step is counted with ``LiveBytes``.
    Returns static bytes (weights, buffers, optimizer state), each phase's largest live bytes
    on top, and ``peak``."""
    if dtype not in ("bfloat16", "float32") or steps < 1:
        raise ValueError(f"measure_step: dtype bfloat16 or float32 and steps >= 1, got {dtype!r} and {steps}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dev = next(model.parameters()).device
    live = None
    for step in range(steps):
        if step == steps - 1:
            held = [*model.parameters(), *model.buffers()]
            held += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            static = sum(t.untyped_storage().nbytes() for t in {LiveBytes.key(t): t for t in held}.values())
            live = LiveBytes({LiveBytes.key(t) for t in (*held, *inputs.values(), targets)})
            live.__enter__()
        try:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                out = model(**inputs)
                logits = out["logits"] if isinstance(out, dict) else out
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
            del out, logits
            if live is not None:
                live.phase = "backward"
            loss.backward()
            del loss
            if live is not None:
                live.phase = "step"
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            if live is not None:
                live.__exit__(None, None, None)
    assert live is not None
    phases = {k: live.peak(k) for k in PHASES}
    return {"static": static, **phases, "peak_phase": max(PHASES, key=lambda k: phases[k]),
            "peak": static + max(phases.values())}
