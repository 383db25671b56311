"""How much accelerator memory a blueprint needs to train: ``build --memory``.

Weights, gradients and optimizer state follow from the parameter count. Activations are
measured, not guessed: the model runs forward (and its cross-entropy) on the ``meta`` device
under ``saved_tensors_hooks``, and every tensor autograd keeps for the backward pass is counted
once (views share their base; parameters are not activations). Two batch sizes give the bytes
per token and the bytes that do not grow with the batch.

Under ``bfloat16`` the forward emulates CUDA autocast where it decides what is saved: the
inputs of matrix products (``linear``, ``matmul``, ``bmm``, ``einsum``, ``conv1d``) are cast to
bf16 before autograd sees them (a parameter's cast counted once, as autocast caches it), and
``scaled_dot_product_attention`` saves, in either dtype, what the fused kernels save (queries,
keys, values, the output and one fp32 log-sum-exp per query), not the math path's attention
matrix that meta would otherwise take. In fp32 the count equals what a real CPU forward saves
(``tests/compiler/test_memory.py``).

The peak of a training step is taken as weights + gradients + optimizer state + activations +
the bf16 weight copies autocast keeps during the forward + the loss's gradient with respect to
the logits (fp32, alive at the start of the backward pass, the moment every activation is
still held). DDP adds its gradient buckets, one more copy of the gradients, unless the gradients
live inside them (``train.ddp_bucket_view``, the default); FSDP divides
weights, gradients and optimizer state by the world size and adds the largest block gathered
twice (the one computing and the one prefetched). With ``train.checkpointing`` the pass runs
first, so only what the checkpointed pieces keep is counted, plus one piece's activations
recomputed during its backward. Eager mode, unfused loss: ``torch.compile``
recomputes cheap operations and saves less, so the estimate is an upper bound for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from physlm_graph._errors import PhysLMError

__all__ = ["MemoryEstimate", "estimate_memory", "OPTIMIZER_STATE"]

# fp32 numbers of optimizer state per parameter
OPTIMIZER_STATE = {"adamw": 2, "muon": 1, "sgd": 1}

_MATMULS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
            torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum, F.conv1d}


class _FlashSaved(torch.autograd.Function):
    """Stands in for fused attention on meta: the output, saving what flash attention saves."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # the fused kernels write the output as (batch, seq, heads, dim), handed back transposed: a
        # following merge of the heads is then a view, and the projection saves the same storage
        out = q.new_empty(*q.shape[:-3], q.shape[-2], q.shape[-3], v.shape[-1]).transpose(-3, -2)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - never run
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Autocast(TorchFunctionMode):
    """CUDA autocast's effect on what autograd saves, for meta tensors (autocast ignores them)."""

    def __init__(self, dtype: torch.dtype | None, params: set[int]) -> None:
        super().__init__()
        self.dtype, self.params = dtype, params
        self.casts: dict[int, torch.Tensor] = {}  # parameter id -> its cached cast

    def _cast(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == self.dtype:
            return x
        if id(x) in self.params:
            if id(x) not in self.casts:
                self.casts[id(x)] = x.to(self.dtype)
            return self.casts[id(x)]
        return x.to(self.dtype)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (self._cast(a) for a in args[:3]) if self.dtype is not None else args[:3]
            return _FlashSaved.apply(q, k, v)
        if func in _MATMULS and self.dtype is not None:
            if func is torch.einsum:
                args = (args[0], *(self._cast(a) for a in args[1:]))
            else:
                args = tuple(self._cast(a) for a in args)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for one training step (see the module's docstring for the model)."""

    dtype: str
    optimizer: str
    batch: int
    seq: int
    world: int
    params: int
    weights: int
    gradients: int
    optimizer_state: int
    activations_per_token: float
    activations_fixed: int
    activations: int
    weight_casts: int
    logits_grad: int
    largest_block: int
    checkpointing: Any
    single: int  # one device, no wrapper
    ddp: int
    fsdp: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _inputs(cm: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    dims = {"batch": batch, "seq": seq}
    out = {}
    for name, shape in cm.resolved.inputs.items():
        try:
            size = [dims[d] if isinstance(d, str) else int(d) for d in shape]
        except KeyError as e:
            raise PhysLMError(f"input {name!r} has dimension {e.args[0]!r}: the memory estimate knows batch and seq")
        out[name] = torch.zeros(size, dtype=torch.long, device="meta")
    return out


def _saved_bytes(module: torch.nn.Module, cm: Any, batch: int, seq: int, dtype: torch.dtype | None) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one forward + loss; and the fp32 logits' bytes."""
    params = {id(p) for p in module.parameters()}
    mode = _Autocast(dtype, params)
    param_storages = {p.untyped_storage()._cdata for p in module.parameters()}
    kept: dict[int, torch.Tensor] = {}  # storage -> a tensor holding it (kept alive: ids stay unique)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        cast_keys = {c.untyped_storage()._cdata for c in mode.casts.values()}
        if key not in param_storages and key not in cast_keys:
            kept[key] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        out = module(**_inputs(cm, batch, seq))
        logits = out["logits"] if isinstance(out, dict) else out
        flat = logits.reshape(-1, logits.size(-1)).float()
        F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device="meta"))
    saved = sum(t.untyped_storage().nbytes() for t in kept.values())
    return saved, flat.numel() * 4


def _largest_block(cm: Any, module: torch.nn.Module, bytes_per: int) -> int:
    """Parameter bytes of the largest block instance (what FSDP gathers at once)."""
    sizes: dict[str, int] = {}
    for path, node in cm.resolved.nodes.items():
        inst = node.instance
        if not inst:
            continue
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            continue
        sizes[inst] = sizes.get(inst, 0) + sum(p.numel() for p in sub.parameters())
    return max(sizes.values(), default=0) * bytes_per


def estimate_memory(cm: Any, *, batch: int, seq: int, dtype: str = "bfloat16", world: int = 1,
                    optimizer: str = "adamw", bucket_view: bool = True, checkpointing: Any = "none") -> MemoryEstimate:
    """Estimate one training step's memory for compiled blueprint ``cm`` (built on meta).

    ``checkpointing`` (``train.checkpointing``) is applied to ``cm.module`` in place; the peak then
    adds one checkpointed piece's recomputed activations (its backward's working set)."""
    if optimizer not in OPTIMIZER_STATE:
        raise PhysLMError(f"unknown optimizer {optimizer!r} for the memory estimate",
                          expected=", ".join(OPTIMIZER_STATE))
    if cm.module is None:
        raise PhysLMError("the memory estimate needs a built module (compile with build=True)")
    module = cm.module
    if any(p.device.type != "meta" for p in module.parameters()):
        raise PhysLMError("the memory estimate runs on a model built on the meta device")
    half = {"bfloat16": torch.bfloat16, "float32": None}[dtype]
    module.train()
    try:
        one, row_logits = _saved_bytes(module, cm, 1, seq, half)
        two, _ = _saved_bytes(module, cm, 2, seq, half)
        recompute = 0
        if checkpointing != "none":
            from physlm_graph._passes import checkpoint_blocks

            plain = (two - one) * batch + max(one - (two - one), 0)
            pieces = checkpoint_blocks(module, cm.resolved, checkpointing)
            one, _ = _saved_bytes(module, cm, 1, seq, half)
            two, _ = _saved_bytes(module, cm, 2, seq, half)
            kept = (two - one) * batch + max(one - (two - one), 0)
            recompute = max(plain - kept, 0) // max(len(pieces), 1)
    except PhysLMError:
        raise
    except Exception as e:  # a component that cannot run on meta (data-dependent shapes, .item())
        raise PhysLMError(f"the memory estimate could not run the model on meta: {type(e).__name__}: {e}",
                          fix="the message names the node: a window (--seq) longer than the model's context is refused "
                          "there, and components whose shapes depend on data values cannot be measured this way")
    logits = row_logits * batch
    per_row = max(two - one, 0)
    fixed = max(one - per_row, 0)
    acts = per_row * batch + fixed
    n = sum(p.numel() for p in module.parameters())
    weights = grads = 4 * n  # fp32 master weights and their gradients (autocast keeps parameters fp32)
    opt = OPTIMIZER_STATE[optimizer] * 4 * n
    casts = 2 * n if half is not None else 0
    block = _largest_block(cm, module, 4)
    acts += recompute
    single = weights + grads + opt + acts + casts + logits
    ddp = single + (0 if bucket_view else grads)
    fsdp = (weights + grads + opt) // max(world, 1) + acts + logits + 2 * block + (casts // max(world, 1))
    return MemoryEstimate(dtype=dtype, optimizer=optimizer, batch=batch, seq=seq, world=world, params=n,
                          weights=weights, gradients=grads, optimizer_state=opt,
                          activations_per_token=per_row / seq, activations_fixed=fixed, activations=acts,
                          weight_casts=casts, logits_grad=logits, largest_block=block, checkpointing=checkpointing, single=single, ddp=ddp,
                          fsdp=fsdp)
