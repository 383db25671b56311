"""Stage 4, infer shapes: build every component on the ``meta`` device and run it on meta
tensors. No weights are allocated, so a 7B blueprint checks in about a second.

Each node is run twice, at sample sizes (batch 2, seq T) and (3, T-1), so the report can name
the symbolic axes (``[batch, seq, 384]``). FLOPs per token come from
``torch.utils.flop_counter`` on the first run (forward FLOPs, at sequence length T).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from physlm_graph._errors import BuildError, ComponentError, Diagnostic, ShapeError, ValidateError
from physlm_graph._ir import Inferred, NodeReport, Ref, Resolved
from physlm_graph._registry import REGISTRY, TensorSpec
from physlm_graph._validate import Checked, topo_order

__all__ = ["infer_shapes", "sample_seq_len", "node_input_specs", "check_output_shapes"]

_B1, _B2 = 2, 3


def sample_seq_len(res: Resolved) -> int:
    """The sequence length used for shapes and FLOPs: ``train.seq_len``, else a ``context``,
    ``max_seq_len`` or ``block_size`` param, else 64."""
    if res.spec.train.seq_len:
        return int(res.spec.train.seq_len)
    for k in ("context", "max_seq_len", "block_size", "seq_len"):
        v = res.params.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:
            return v
    return 64


def _input_spec(symbols: tuple[str, ...], b: int, t: int) -> TensorSpec:
    shape = []
    syms: list[str | None] = []
    for s in symbols:
        if s == "batch":
            shape.append(b)
            syms.append("batch")
        elif s == "seq":
            shape.append(t)
            syms.append("seq")
        else:
            shape.append(int(s))
            syms.append(None)
    dtype = torch.long if all(s in ("batch", "seq") for s in symbols) else torch.float32
    return TensorSpec(tuple(shape), dtype, tuple(syms))


def _name_axes(a: torch.Tensor, b: torch.Tensor, t1: int, t2: int) -> tuple[str | None, ...]:
    syms: list[str | None] = []
    for x, y in zip(a.shape, b.shape):
        if x == _B1 and y == _B2:
            syms.append("batch")
        elif x == t1 and y == t2:
            syms.append("seq")
        else:
            syms.append(None)
    return tuple(syms)


def _as_tuple(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return list(out)
    raise TypeError(f"returned {type(out).__name__}, not a tensor or a tuple of tensors")


def node_input_specs(res: Resolved, path: str, specs: dict[str, list[TensorSpec]]) -> dict[str, TensorSpec]:
    """The input specs of a node keyed by port (positional inputs get the declared port names,
    or ``in0, in1, ...`` for variadic ops)."""
    node = res.nodes[path]
    info = REGISTRY.get(node.use)
    assert info is not None
    out: dict[str, TensorSpec] = {}
    for i, (port, ref) in enumerate(node.inputs):
        name = port if port is not None else (info.inputs[i] if not info.variadic and i < len(info.inputs) else f"in{i}")
        out[name] = _spec_of(res, ref, specs)
    return out


def _spec_of(res: Resolved, ref: Ref, specs: dict[str, list[TensorSpec]]) -> TensorSpec:
    outs = specs[ref.node]
    if ref.port is None:
        return outs[0]
    info = REGISTRY.get(res.nodes[ref.node].use) if ref.node in res.nodes else None
    idx = info.outputs.index(ref.port) if info is not None else 0
    return outs[idx]


def _ordered_args(res: Resolved, path: str, ins: dict[str, TensorSpec], tensors: dict[str, torch.Tensor]) -> list[Any]:
    info = REGISTRY.get(res.nodes[path].use)
    assert info is not None
    if info.variadic:
        return [tensors[k] for k in ins]
    return [tensors.get(p) for p in info.inputs]


def _located(res: Resolved, path: str, exc: ComponentError, kind: type) -> Exception:
    node = res.nodes[path]
    src = node.src + ((exc.param,) if exc.param and exc.param in node.params else ())
    return kind(Diagnostic(exc.message, loc=res.doc.loc(src), node=path, expected=exc.expected, got=exc.got, fix=exc.fix))


def _unbuildable(res: Resolved, path: str, name: str, exc: Exception) -> Diagnostic:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return Diagnostic(f"{name} could not be built: {first}", loc=res.doc.loc(res.nodes[path].src), node=path,
                      fix="check its sizes: they may be far too large")


def build_modules(res: Resolved, checked: Checked, specs: dict[str, list[TensorSpec]], device: str | torch.device,
                  order: list[str]) -> dict[str, nn.Module]:
    """Call every builder on ``device`` (used by inference on meta and by the fx build)."""
    modules: dict[str, nn.Module] = {}
    for path in order:
        info = REGISTRY.get(res.nodes[path].use)
        assert info is not None
        if info.builder is None:
            continue
        ins = node_input_specs(res, path, specs)
        try:
            with torch.device(device), (no_init() if str(device) == "meta" else contextlib.nullcontext()):
                modules[path] = info.builder(checked[path], ins)
        except ComponentError as exc:
            raise _located(res, path, exc, ValidateError) from None
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:  # e.g. out of memory
            raise BuildError(_unbuildable(res, path, info.name, exc)) from None
    return modules


def infer_shapes(res: Resolved, checked: Checked) -> Inferred:
    order = topo_order(res)
    t1 = sample_seq_len(res)
    t2 = t1 - 1 if t1 > 2 else t1 + 1
    specs: dict[str, list[TensorSpec]] = {}
    runs: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, symbols in res.inputs.items():
        s1, s2 = _input_spec(symbols, _B1, t1), _input_spec(symbols, _B2, t2)
        specs[name] = [s1]
        runs[0][name] = torch.empty(s1.shape, dtype=s1.dtype, device="meta")
        runs[1][name] = torch.empty(s2.shape, dtype=s2.dtype, device="meta")
    port_tensors: list[dict[str, list[torch.Tensor]]] = [{k: [v] for k, v in r.items()} for r in runs]
    modules: dict[str, nn.Module] = {}
    reports: list[NodeReport] = []
    errors: list[Diagnostic] = []
    for path in order:
        node = res.nodes[path]
        info = REGISTRY.get(node.use)
        assert info is not None
        ins = node_input_specs(res, path, specs)
        module = None
        if info.builder is not None:
            try:
                with torch.device("meta"), no_init():
                    module = info.builder(checked[path], ins)
            except ComponentError as exc:
                err = _located(res, path, exc, ShapeError)
                errors.extend(err.diagnostics)  # type: ignore[attr-defined]
                break
            except Exception as exc:  # torch refuses the module (a width of 2**31 overflows even on meta)
                errors.append(_unbuildable(res, path, info.name, exc))
                break
            module.eval()
            modules[path] = module
        tied_to = None
        if node.tie is not None and module is not None:
            target = modules.get(node.tie)
            tinfo = REGISTRY.get(res.nodes[node.tie].use)
            tp = getattr(target, tinfo.tie_param, None) if target is not None and tinfo and tinfo.tie_param else None
            mine = getattr(module, info.tie_param or "", None)
            if tp is None or mine is None or tuple(tp.shape) != tuple(mine.shape):
                errors.append(Diagnostic(
                    f"cannot tie {path}.{info.tie_param} to {node.tie}.{tinfo.tie_param if tinfo else '?'}",
                    loc=res.doc.loc(node.src + ("tie",)), node=path,
                    expected=str(tuple(tp.shape)) if tp is not None else "a weight",
                    got=str(tuple(mine.shape)) if mine is not None else "none"))
                break
            setattr(module, info.tie_param, tp)  # type: ignore[arg-type]
            tied_to = node.tie
        outs: list[list[torch.Tensor]] = []
        flops = 0.0
        for k, pt in enumerate(port_tensors):
            tensors = {}
            for i, (port, ref) in enumerate(node.inputs):
                name = port if port is not None else (info.inputs[i] if not info.variadic and i < len(info.inputs) else f"in{i}")
                src_outs = pt[ref.node]
                idx = 0
                if ref.port is not None and ref.node in res.nodes:
                    idx = REGISTRY.get(res.nodes[ref.node].use).outputs.index(ref.port)  # type: ignore[union-attr]
                tensors[name] = src_outs[idx]
            args = _ordered_args(res, path, ins, tensors)
            try:
                counter = FlopCounterMode(display=False) if k == 0 else None
                if True:  # grad stays on: FlopCounterMode's module hooks need autograd views
                    if counter is not None:
                        with counter:
                            out = module(*args) if module is not None else info.function(*args, **checked[path].model_dump())  # type: ignore[misc]
                        flops = float(counter.get_total_flops())
                    else:
                        out = module(*args) if module is not None else info.function(*args, **checked[path].model_dump())  # type: ignore[misc]
                outs.append(_as_tuple(out))
            except ComponentError as exc:
                errors.extend(_located(res, path, exc, ShapeError).diagnostics)  # type: ignore[attr-defined]
                break
            except Exception as exc:  # a shape mismatch inside the component's forward
                srcs = ", ".join(f"{r} {ins_spec.pretty()}" for (_, r), ins_spec in zip(node.inputs, ins.values()))
                if info.function is not None:
                    errors.append(Diagnostic(
                        f"{info.name} cannot combine inputs of shapes {srcs}", loc=res.doc.loc(node.src + ("in",)),
                        node=path, fix="the inputs must have the same shape (or broadcast); check the widths of the nodes feeding it"))
                    break
                errors.append(Diagnostic(
                    f"{info.name} failed on its inputs ({srcs}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                    loc=res.doc.loc(node.src + ("in",)), node=path,
                    fix="check the widths of the nodes feeding it"))
                break
        if len(outs) < 2:
            break
        if len(outs[0]) != len(info.outputs):
            errors.append(Diagnostic(f"{info.name} returned {len(outs[0])} outputs but declares {len(info.outputs)}",
                                     loc=res.doc.loc(node.src), node=path))
            break
        port_tensors[0][path], port_tensors[1][path] = outs[0], outs[1]
        specs[path] = [TensorSpec(tuple(a.shape), a.dtype, _name_axes(a, b, t1, t2)) for a, b in zip(outs[0], outs[1])]
        nparams = sum(p.numel() for n, p in module.named_parameters() if not (tied_to and n == info.tie_param)) if module is not None else 0
        reports.append(NodeReport(path=path, use=node.use, out_shapes=[(p, s.pretty()) for p, s in zip(info.outputs, specs[path])],
                                  params=nparams, flops_per_token=flops / (_B1 * t1), tied_to=tied_to))
    if errors:
        raise ShapeError(errors)
    seen: set[int] = set()
    total = 0
    for m in modules.values():
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    check_output_shapes(res, specs)
    shapes = {f"{path}.{name}": tuple(t.shape) for path, m in modules.items() for name, t in m.state_dict().items()}
    return Inferred(resolved=res, specs=specs, reports=reports, total_params=total,
                    flops_per_token=sum(r.flops_per_token for r in reports), sample={"batch": _B1, "seq": t1},
                    tensor_shapes=shapes)


def check_output_shapes(res: Resolved, specs: dict[str, list[TensorSpec]]) -> None:
    """What the runtime reads of the graph has the shape it needs: ``logits`` is (batch, seq,
    vocab), every loss source is a scalar, every exit's hidden state is shaped like what the
    final head reads."""
    from physlm_graph._resolve import exit_heads

    errors: list[Diagnostic] = []
    ref = res.outputs.get("logits")
    if ref is not None:
        got = _spec_of(res, ref, specs)
        if len(got.shape) != 3 or tuple(got.symbols or ())[:2] != ("batch", "seq") or got.shape[-1] < 2:
            errors.append(Diagnostic(
                f"output 'logits' ({ref}) is not shaped (batch, seq, vocab)", loc=res.doc.loc(("outputs", "logits")),
                node=ref.node, expected="[batch, seq, vocab], vocab >= 2", got=got.pretty(),
                fix="point logits at the LM head (head.lm), whose output is one score per token of the vocabulary"))
    for loss in res.losses:
        for r in loss.refs:
            got = _spec_of(res, r, specs)
            if got.shape != ():
                errors.append(Diagnostic(
                    f"loss {loss.name!r}: {r} is not a scalar", loc=res.doc.loc(loss.src + ("from",)), node=r.node,
                    expected="a scalar (shape [])", got=got.pretty(),
                    fix="a loss gathers scalar ports (e.g. moe.topk's balance, loss.gravity_repulsion's loss)"))
                break  # one per loss: a glob repeats the same mistake in every instance
    if res.exit_points and res.spec.exits is not None:
        plan, _ = exit_heads(res.spec, res.nodes, res.outputs)
        if plan is not None:
            reader = res.nodes[plan.norm or plan.head]
            want = _spec_of(res, reader.inputs[0][1], specs) if reader.inputs else None
            for p in res.exit_points:
                outs = res.instance_outputs.get(p)
                got = _spec_of(res, next(iter(outs.values())) if outs else Ref(p), specs)
                if want is not None and got.pretty() != want.pretty():
                    after = res.spec.exits.after
                    src = ("exits", "after", after.index(p)) if p in after else ("exits", "every")
                    errors.append(Diagnostic(
                        f"exit point {p!r} is not shaped like the input of the exit head ({reader.path} reads "
                        f"{want.pretty()})", loc=res.doc.loc(src), expected=want.pretty(), got=got.pretty(),
                        fix="exit after block instances (or nodes) that carry the residual stream the final head reads"))
    if errors:
        raise ShapeError(errors)


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
             "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip ``torch.nn.init`` fills while building on the meta device: there is nothing to
    fill, and meta fills route through PyTorch's Python reference kernels, whose first use
    imports torch._dynamo (seconds). Transformers' ``no_init_weights`` does the same."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FNS}
    try:
        for name in _INIT_FNS:
            setattr(init, name, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)
