"""Will the weights fit? Checked from the inferred shapes, before the build allocates anything.

Shape inference builds every component on the ``meta`` device, so the parameter count of a
blueprint is known before one byte is allocated. ``check_fits`` compares what the weights need
(the parameters, in the default float dtype) with the memory available on the device the build
allocates on: the free memory of a CUDA device, or on the CPU the smaller of the kernel's
``MemAvailable`` and what the process's cgroup still allows. A model that cannot fit is a
``BuildError`` located at the node holding the largest tensor, naming that tensor and its
shape, instead of an allocator's error (or the kernel's out-of-memory kill, which is what an
over-committed allocation on Linux ends in). Where the available memory cannot be read, nothing
is checked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from physlm_graph._errors import BuildError, Diagnostic
from physlm_graph._ir import Inferred

__all__ = ["available_bytes", "check_fits", "weight_bytes"]


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes(device: str | torch.device) -> tuple[int, str] | None:
    """(bytes the device can still hold, how that was measured), or None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    if dev.type != "cpu":
        return None
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "available in RAM"))
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        found.append((max(limit - used, 0), "left under this process's cgroup limit"))
    return min(found) if found else None


def weight_bytes(inf: Inferred) -> int:
    """What the weights take: every parameter once (tied ones once) in the default float dtype."""
    return inf.total_params * torch.empty((), dtype=torch.get_default_dtype()).element_size()


def _size(n: float) -> str:
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):,.1f} {unit}"
    return f"{int(n):,} bytes"


def _owner(inf: Inferred, name: str) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in inf.resolved.nodes:
            return ".".join(parts[:i])
    return parts[0]


def check_fits(inf: Inferred, device: str | torch.device, *, available: tuple[int, str] | None = None) -> None:
    """Raise a located ``BuildError`` when the weights of ``inf`` cannot fit on ``device``
    (``available`` overrides the measurement: tests, or a budget of one's own)."""
    if str(device) == "meta":
        return
    avail = available if available is not None else available_bytes(device)
    need = weight_bytes(inf)
    if avail is None or need <= avail[0]:
        return
    res = inf.resolved
    elem = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    tied = {r.path for r in inf.reports if r.tied_to is not None}
    tensors = [(n, s) for n, s in inf.tensor_shapes.items() if _owner(inf, n) not in tied]
    name, shape = max(tensors, key=lambda t: _numel(t[1])) if tensors else ("?", ())
    path = _owner(inf, name)
    dtype = str(torch.get_default_dtype()).removeprefix("torch.")
    raise BuildError(Diagnostic(
        f"the weights do not fit: {inf.total_params:,} parameters need {_size(need)} in {dtype}, more than the "
        f"{_size(avail[0])} {avail[1]}; the largest tensor is {name} {list(shape)} ({_size(_numel(shape) * elem)})",
        loc=res.doc.loc(res.nodes[path].src) if path in res.nodes else None, node=path,
        fix="make the model smaller (vocab, dim, layers), or check it without weights on the meta device "
            "(`physlm-graph build`, compile_blueprint(..., device=\"meta\"))"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
