"""``cast``: the op that sets the residual stream's dtype (``gpt2-124m.yaml``'s ``params.residual``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from physlm_graph import compile_blueprint
from physlm_graph.components.ops.basic import cast

ROOT = Path(__file__).resolve().parents[2]
TINY_GPT2 = {"params.layers": 2, "params.dim": 32, "params.heads": 2, "params.context": 16, "params.vocab": 64,
             "train.seq_len": 16}


def test_cast_modes():
    x = torch.randn(2, 3)
    assert cast(x, to="keep") is x
    assert cast(x, to="autocast") is x  # autocast off: the identity
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cast(x, to="autocast").dtype == torch.bfloat16
        assert cast(x, to="keep").dtype == torch.float32
    assert cast(x, to="float16").dtype == torch.float16
    assert torch.equal(cast(x.bfloat16(), to="float32"), x.bfloat16().float())


def _gpt2(residual: str):
    torch.manual_seed(0)
    return compile_blueprint(ROOT / "blueprints" / "gpt2-124m.yaml", overrides={**TINY_GPT2, "params.residual": residual})


def _stream_dtypes(module, tokens):
    """The residual stream's dtype entering the second block and the final norm."""
    seen = []
    hooks = [module.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
             for name in ("trunk.1.ln1", "norm")]
    try:
        out = module(tokens)["logits"]
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_gpt2_residual_autocast_makes_the_stream_bf16_and_only_under_autocast():
    keep, bf = _gpt2("keep"), _gpt2("autocast")
    assert keep.num_params == bf.num_params
    bf.module.load_state_dict(keep.module.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        a, a_dt = _stream_dtypes(keep.module, tokens)
        b, b_dt = _stream_dtypes(bf.module, tokens)
        assert torch.equal(a, b) and a_dt == b_dt == [torch.float32, torch.float32]  # fp32: the same function
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, a_dt = _stream_dtypes(keep.module, tokens)
            b, b_dt = _stream_dtypes(bf.module, tokens)
    assert a_dt == [torch.float32, torch.float32]  # nanoGPT's numerics: fp32 + bf16 -> fp32 at every add
    assert b_dt == [torch.bfloat16, torch.bfloat16]
    assert not torch.equal(a, b)  # the adds round to bf16 now
    torch.testing.assert_close(b.float(), a.float(), rtol=0.1, atol=0.1)  # the same model, coarser sums


@pytest.mark.parametrize("residual", ["keep", "autocast"])
def test_gpt2_residual_trains_a_step_with_gradients_everywhere(residual):
    cm = _gpt2(residual)
    tokens = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = cm.module(tokens)["logits"]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cm.module.parameters())
    assert all(p.grad.dtype == torch.float32 for p in cm.module.parameters())  # fp32 weights, fp32 gradients


def test_gpt2_bf16_residual_is_causal():
    """Changing tokens after t leaves the logits at positions <= t unchanged, under bf16 autocast."""
    cm = _gpt2("autocast")
    cm.module.eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 16), generator=g)
    for t in (0, 7, 14):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, 64, changed[:, t + 1:].shape, generator=g)
        assert not torch.equal(changed, tokens)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = cm.module(tokens)["logits"], cm.module(changed)["logits"]
        assert torch.equal(a[:, : t + 1], b[:, : t + 1]), t
        assert not torch.equal(a[:, t + 1:], b[:, t + 1:])  # the check can see a change where there is one


def test_gpt2_blueprint_ships_the_bf16_stream():
    """The shipped blueprint's default (no params.residual override) is the bf16 stream under autocast."""
    torch.manual_seed(0)
    cm = compile_blueprint(ROOT / "blueprints" / "gpt2-124m.yaml", overrides=TINY_GPT2)
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, dtypes = _stream_dtypes(cm.module, tokens)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
