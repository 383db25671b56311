"""What ``PhysLMForCausalLM`` does to its graph for fine-tuning: the embedding table, resizing the
vocabulary, gradient checkpointing.

- The input embeddings are the ``embed.token`` node fed by the graph's token input; a head that
  shares its table (``tie:``) keeps sharing it when the module is replaced.
- ``resize_token_embeddings(n)`` compiles the blueprint again with ``params.vocab: n`` (so the
  blueprint stays the truth: ``save_pretrained`` writes the new size) and copies every weight
  over; the tensors with a vocabulary dimension keep their first rows, and new rows start at
  the mean of the old ones (``mean_resizing``, as transformers does) or as the builder drew them.
- Gradient checkpointing wraps the ``forward`` of each component module the graph calls that has
  parameters (not the token embedding): in training with grad enabled its activations are not
  kept but recomputed in the backward pass. Module names and weights do not change.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from physlm_graph._errors import PhysLMError

__all__ = ["input_embeddings", "set_input_embeddings", "output_embeddings", "resize_token_embeddings",
           "set_checkpointing", "rebuild"]


def _embedding_path(model: Any) -> str:
    cm = model.compiled
    token_inputs = set(cm.resolved.inputs)
    found = [p for p, n in cm.resolved.nodes.items() if n.use == "embed.token"]
    fed = [p for p in found if any(ref.node in token_inputs for _, ref in cm.resolved.nodes[p].inputs)]
    paths = fed or found
    if not paths:
        raise PhysLMError("the graph has no embed.token node, so it has no input embedding table",
                          fix="use a blueprint whose tokens go through embed.token")
    return paths[0]


def input_embeddings(model: Any) -> torch.nn.Module:
    """The token embedding module (``embed.token``: ``weight`` (vocab, dim), called on token ids)."""
    return model.model.get_submodule(_embedding_path(model))


def output_embeddings(model: Any) -> torch.nn.Module | None:
    """The module computing the logits when it holds a (vocab, dim) ``weight`` (``head.lm``), else None."""
    ref = model.compiled.resolved.outputs.get("logits")
    if ref is None:
        return None
    module = model.model.get_submodule(ref.node)
    w = getattr(module, "weight", None)
    return module if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def set_input_embeddings(model: Any, value: torch.nn.Module) -> None:
    path = _embedding_path(model)
    old = model.model.get_submodule(path)
    weight = getattr(value, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != old.weight.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else "none"
        raise PhysLMError(f"the new input embeddings must hold a weight (vocab, {old.weight.shape[1]}); got {got}",
                          fix="pass an nn.Embedding (or embed.token module) of the model's width")
    head = output_embeddings(model)
    parent, _, name = path.rpartition(".")
    setattr(model.model.get_submodule(parent) if parent else model.model, name, value)
    if head is not None and head.weight is old.weight:  # tied: the head reads the new table too
        head.weight = value.weight


def rebuild(model: Any, overrides: dict[str, Any], *, mean_resizing: bool = True) -> None:
    """Compile the model's blueprint again with ``overrides`` and carry every weight over; a
    tensor that changed size along one dimension keeps its overlap (new rows: see the module)."""
    from physlm_graph._compile import compile_blueprint

    ref = next(model.model.parameters())
    cm = compile_blueprint(model.config.blueprint, overrides=overrides, stage=getattr(model.config, "growth_stage", None))
    old = model.model.state_dict()
    with torch.no_grad():
        for key, new in cm.module.state_dict().items():
            if key not in old:
                raise PhysLMError(f"recompiling added the weight {key}", fix="change only params.vocab")
            _carry(old[key], new, mean_resizing)
    cm.module.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    cm.module.train(model.model.training)
    model.adopt(cm)
    if model.checkpointing is not None:
        set_checkpointing(model, True, *model.checkpointing)


def _carry(old: torch.Tensor, new: torch.Tensor, mean_resizing: bool) -> None:
    if old.shape == new.shape:
        new.copy_(old)
        return
    diff = [d for d in range(new.dim()) if old.shape[d] != new.shape[d]] if old.dim() == new.dim() else []
    if len(diff) != 1:
        raise PhysLMError(f"a weight changed shape {tuple(old.shape)} -> {tuple(new.shape)}",
                          fix="change only params.vocab")
    d = diff[0]
    keep = min(old.shape[d], new.shape[d])
    new.narrow(d, 0, keep).copy_(old.narrow(d, 0, keep))
    grown = new.shape[d] - keep
    if grown > 0 and mean_resizing and old.is_floating_point():
        mean = old.float().mean(dim=d, keepdim=True).to(new.dtype)
        new.narrow(d, keep, grown).copy_(mean.expand_as(new.narrow(d, keep, grown)))


def resize_token_embeddings(model: Any, new_num_tokens: int | None, pad_to_multiple_of: int | None,
                            mean_resizing: bool) -> torch.nn.Module:
    """Change the vocabulary to ``new_num_tokens`` ids (rounded up to ``pad_to_multiple_of``)."""
    emb = input_embeddings(model)
    if new_num_tokens is None and pad_to_multiple_of is None:
        return emb
    n = int(new_num_tokens if new_num_tokens is not None else emb.weight.shape[0])
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    if n < 1:
        raise PhysLMError(f"new_num_tokens must be >= 1, got {n}")
    if n == emb.weight.shape[0]:
        return emb
    params = model.compiled.blueprint.get("params") or {}
    if not isinstance(params.get("vocab"), int):
        raise PhysLMError("the blueprint has no integer params.vocab, so its vocabulary cannot be resized",
                          fix="give the blueprint params.vocab and use ${vocab} in embed.token and head.lm")
    rebuild(model, {"params.vocab": n}, mean_resizing=mean_resizing)
    return input_embeddings(model)


def set_checkpointing(model: Any, enable: bool, func: Any = None, every_n: int = 1) -> None:
    """Turn gradient checkpointing on (every ``every_n``-th component module) or off."""
    for m in model.model.modules():
        m.__dict__.pop("forward", None)  # our wrapper lives on the instance; the class's forward returns
    if not enable:
        model.__dict__["checkpointing"] = None
        return
    if every_n < 1:
        raise PhysLMError(f"every_n_layers must be >= 1, got {every_n}")
    func = func if func is not None else functools.partial(checkpoint, use_reentrant=False)
    embedding = input_embeddings(model)
    seen: set[int] = set()
    targets = []
    for node in model.model.graph.nodes:
        if node.op != "call_module":
            continue
        m = model.model.get_submodule(node.target)
        if m is embedding or id(m) in seen or not any(True for _ in m.parameters()):
            continue
        seen.add(id(m))
        targets.append(m)
    for m in targets[::every_n]:
        _wrap(m, func)
    model.__dict__["checkpointing"] = (func, every_n)


def _wrap(m: torch.nn.Module, func: Any) -> None:
    original = type(m).forward.__get__(m)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if m.training and torch.is_grad_enabled():
            return func(original, *args, **kwargs)
        return original(*args, **kwargs)

    m.forward = forward  # type: ignore[method-assign]
