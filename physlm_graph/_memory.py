"""How much accelerator memory a blueprint needs to train: ``build --memory``.

The peak of a training step is not a sum of everything the step ever holds: some of it is never
alive at the same time. With gradients set to None between steps (``zero_grad(set_to_none=True)``),
a step goes through three phases:

- **forward** (model and loss): the activations autograd saves pile up, with autocast's bf16
  copies of the weights and the loss's transients (the bf16 logits, their fp32 copy, the
  log-softmax output); no gradients exist yet.
- **backward**: it starts with every saved activation alive plus the loss's gradients (the
  gradient of the log-softmax output and of the fp32 logits, each the size of the fp32 logits);
  as it goes, saved tensors and weight copies are freed and the parameters' gradients appear.
  With ``train.checkpointing`` a checkpointed piece's activations are recomputed here.
- **step**: every gradient exists, the activations are gone; fused AdamW updates in place (an
  optimizer's own temporaries, such as Muon's orthogonalization of one matrix, are not counted).
  The backward ends holding every gradient, so this phase sets the peak only when it allocates.

Static memory (fp32 weights, buffers and optimizer state, allocated by the first step) is alive
throughout, so the peak is ``static + max(forward, backward, step)``, and ``peak_phase`` names
the phase that sets it.

The phases are measured, not guessed: the model runs forward, its cross-entropy on fp32 logits
and the backward pass on the ``meta`` device, at the asked batch and window, while a dispatch
mode (``physlm_graph._livebytes.LiveBytes``) counts the bytes of every storage an operation
creates for as long as it lives (views share their base). Meta tensors hold no data, so this costs what the operations' bookkeeping costs.
``tests/compiler/test_memory.py`` checks it against the same count on a real CPU training step.

Under ``bfloat16`` the pass emulates CUDA autocast where it decides what exists: the inputs of
matrix products (``linear``, ``matmul``, ``bmm``, ``einsum``, ``conv1d``) are cast to bf16 (a
parameter's cast cached for the forward, as autocast does, and made afresh in a checkpointed
piece's recomputation), and ``scaled_dot_product_attention`` saves, in either dtype, what the
fused kernels save (queries, keys, values, the output and one fp32 log-sum-exp per query), not
the math path's attention matrix that meta would otherwise take.

DDP keeps the gradients in its buckets, allocated once: under DDP they are static, and the
backward phase counts without them; without ``train.ddp_bucket_view`` the buckets are one more
copy. FSDP (bf16 all-gathers, so no autocast weight copies) divides weights and optimizer state
by the world size, keeps each device's shard of the gradients plus one block's unsharded
gradients before their reduce-scatter, and adds the largest block gathered twice (the one
computing and the one prefetched); the FSDP column is a model, not measured like the phases.
Eager mode, unfused loss: ``torch.compile`` recomputes cheap operations and saves less, so the
estimate is an upper bound for it. Allocator rounding and library workspaces are not counted.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from physlm_graph._errors import PhysLMError
from physlm_graph._livebytes import PHASES, LiveBytes

__all__ = ["MemoryEstimate", "estimate_memory", "OPTIMIZER_STATE", "PHASES"]

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
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Autocast(TorchFunctionMode):
    """CUDA autocast's effect on what exists, for meta tensors (autocast ignores them)."""

    def __init__(self, dtype: torch.dtype | None, params: set[int], live: LiveBytes | None = None) -> None:
        super().__init__()
        self.dtype, self.params, self.live = dtype, params, live
        self.casts: dict[int, torch.Tensor] = {}  # parameter id -> its cached cast
        self.cache = True  # off once the forward's autocast region has closed

    def _cast(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == self.dtype:
            return x
        if id(x) in self.params:
            if id(x) in self.casts:
                return self.casts[id(x)]
            c = x.to(self.dtype)
            if self.live is not None:
                self.live.mark(c, "cast")
            if self.cache:
                self.casts[id(x)] = c
            return c
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
    """Bytes per device for one training step (see the module's docstring for the model).

    ``forward``, ``backward`` and ``step`` are each phase's largest live bytes on top of
    ``static`` (weights, buffers, optimizer state); ``single`` = ``static`` + the largest, the
    phase ``peak_phase``. ``activations`` is what autograd saves for the backward pass (without
    the weight copies, ``weight_casts``), ``logits_grad`` the size of one fp32 logits gradient,
    ``gradients_bytes`` of all the gradients (``gradients``: the fp32 gradients of the parameter
    count)."""

    dtype: str
    optimizer: str
    batch: int
    seq: int
    world: int
    params: int
    weights: int
    buffers: int
    gradients: int
    optimizer_state: int
    static: int
    activations_per_token: float
    activations_fixed: int
    activations: int
    weight_casts: int
    logits_grad: int
    forward: int
    backward: int
    step: int
    peak_phase: str
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


@dataclass
class _Pass:
    saved: int  # bytes autograd keeps for backward (the inputs included; parameters and weight casts not)
    casts: int  # bytes of the weight casts made in the forward
    logits: int  # bytes of the fp32 logits
    live: LiveBytes | None  # the phases, when the backward ran
    grads: int  # bytes of the gradients at the end of the backward


def _run(module: torch.nn.Module, cm: Any, batch: int, seq: int, dtype: torch.dtype | None, backward: bool) -> _Pass:
    """One forward + cross-entropy on meta (and its backward when ``backward``), counted."""
    params = list(module.parameters())
    param_keys = {LiveBytes.key(p) for p in params}
    inputs = _inputs(cm, batch, seq)
    existing = param_keys | {LiveBytes.key(t) for t in (*module.buffers(), *inputs.values())}
    live = LiveBytes(existing) if backward else None
    mode = _Autocast(dtype, {id(p) for p in params}, live)
    kept: dict[int, torch.Tensor] = {}  # storage -> a tensor holding it (kept alive: ids stay unique)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = LiveBytes.key(t)
        if key not in param_keys and key not in {LiveBytes.key(c) for c in mode.casts.values()}:
            kept[key] = t
        return t

    hooks = [p.register_post_accumulate_grad_hook(lambda p: live.mark(p.grad, "grad")) for p in params] if live else []
    try:
        with live if live is not None else nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
                out = module(**inputs)
                logits = out["logits"] if isinstance(out, dict) else out
                flat = logits.reshape(-1, logits.size(-1)).float()
                loss = F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device="meta"))
            saved = sum(t.untyped_storage().nbytes() for t in kept.values())
            casts = sum(c.untyped_storage().nbytes() for c in mode.casts.values())
            n_logits = flat.numel() * 4
            kept.clear()
            mode.casts.clear()  # autocast's region closes: its cache goes
            mode.cache = False
            del out, logits, flat
            grads = 0
            if live is not None:
                live.phase = "backward"
                with mode:  # on for a checkpointed piece's recomputation; the engine directly, since
                    # ``loss.backward()`` would run inside the mode's handler, where the mode is off
                    seed = (torch.ones_like(loss),)
                    torch.autograd.graph._engine_run_backward((loss,), seed, False, False, (), True, True)
                del loss
                live.phase = "step"
                seen: set[int] = set()
                for p in params:
                    if p.grad is not None and LiveBytes.key(p.grad) not in seen:
                        seen.add(LiveBytes.key(p.grad))
                        grads += p.grad.untyped_storage().nbytes()
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.grad = None
    return _Pass(saved, casts, n_logits, live, grads)


def _largest_block(cm: Any, module: torch.nn.Module) -> int:
    """Parameters of the largest block instance (what FSDP gathers at once)."""
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
    return max(sizes.values(), default=0)


def estimate_memory(cm: Any, *, batch: int, seq: int, dtype: str = "bfloat16", world: int = 1,
                    optimizer: str | dict[str, int] = "adamw", bucket_view: bool = True,
                    checkpointing: Any = "none") -> MemoryEstimate:
    """Estimate one training step's memory for compiled blueprint ``cm`` (built on meta): static
    memory plus the largest of the forward, backward and step phases (the module's docstring).

    ``optimizer`` is one optimizer for every parameter, or the parameter count each optimizer
    trains (``train.optimizers``' groups: ``{"muon": n1, "adamw": n2}``).

    ``checkpointing`` (``train.checkpointing``) is applied to ``cm.module`` in place before the
    count; its recomputation is then part of the backward phase."""
    for name in optimizer if isinstance(optimizer, dict) else [optimizer]:
        if name not in OPTIMIZER_STATE:
            raise PhysLMError(f"unknown optimizer {name!r} for the memory estimate",
                              expected=", ".join(OPTIMIZER_STATE))
    if cm.module is None:
        raise PhysLMError("the memory estimate needs a built module (compile with build=True)")
    module = cm.module
    if any(p.device.type != "meta" for p in module.parameters()):
        raise PhysLMError("the memory estimate runs on a model built on the meta device")
    half = {"bfloat16": torch.bfloat16, "float32": None}[dtype]
    module.train()
    try:
        if checkpointing != "none":
            from physlm_graph._passes import checkpoint_blocks

            checkpoint_blocks(module, cm.resolved, checkpointing)
        one = _run(module, cm, 1, seq, half, backward=False).saved
        two = _run(module, cm, 2, seq, half, backward=False).saved
        full = _run(module, cm, batch, seq, half, backward=True)
    except PhysLMError:
        raise
    except Exception as e:  # a component that cannot run on meta (data-dependent shapes, .item())
        raise PhysLMError(f"the memory estimate could not run the model on meta: {type(e).__name__}: {e}",
                          fix="the message names the node: a window (--seq) longer than the model's context is refused "
                          "there, and components whose shapes depend on data values cannot be measured this way")
    live = full.live
    assert live is not None
    per_row = max(two - one, 0)
    n = sum(p.numel() for p in module.parameters())
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    grads = 4 * n  # fp32 gradients (autocast keeps the parameters fp32)
    counts = optimizer if isinstance(optimizer, dict) else {optimizer: n}
    opt = sum(OPTIMIZER_STATE[o] * 4 * k for o, k in counts.items())
    label = " + ".join(counts) if isinstance(optimizer, dict) else optimizer
    static = weights + buffers + opt
    phases = {"forward": live.peak("forward"), "backward": live.peak("backward"),
              "step": full.grads}  # fused AdamW: every gradient, no temporaries
    peak_phase = max(PHASES, key=lambda k: phases[k])
    single = static + phases[peak_phase]
    # DDP: the buckets hold the gradients for the whole run; with the bucket view the gradients
    # are written into them, else they are one more copy next to the gradients autograd makes
    if bucket_view:
        ddp = static + full.grads + max(phases["forward"], live.peak("backward", 1))
    else:
        ddp = single + full.grads
    w = max(world, 1)
    block = _largest_block(cm, module)
    gathered = 2 * block * (2 if half is not None else 4)
    fsdp = ((weights + opt) // w + buffers + gathered
            + max(live.peak("forward", 2), live.peak("backward", 2) + full.grads // w + 4 * block, full.grads // w))
    return MemoryEstimate(dtype=dtype, optimizer=label, batch=batch, seq=seq, world=world, params=n,
                          weights=weights, buffers=buffers, gradients=grads, optimizer_state=opt, static=static,
                          activations_per_token=per_row / seq, activations_fixed=max(one - per_row, 0),
                          activations=full.saved, weight_casts=full.casts, logits_grad=full.logits,
                          forward=phases["forward"], backward=phases["backward"], step=phases["step"],
                          peak_phase=peak_phase, largest_block=block * 4, checkpointing=checkpointing,
                          single=single, ddp=ddp, fsdp=fsdp)

