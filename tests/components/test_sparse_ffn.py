"""ffn.cortical_columns and ffn.prime_masked: masks, their survival under training, references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from physlm_graph import REGISTRY, ComponentError, Example
from physlm_graph.testing import build_example

# -- ffn.cortical_columns -----------------------------------------------------------------


def _columns(params: dict, shape=(2, 5, 16)):
    base = {"num_columns": 4, "column_size": shape[-1] // 4}
    return build_example("ffn.cortical_columns", Example({**base, **params}, {"x": shape}))


def _zeros_per_group(w: torch.Tensor) -> torch.Tensor:
    return (w == 0).reshape(w.shape[0], -1, 4).sum(-1)  # (O, I/4) zeros in each group of 4 inputs


def test_fixed_is_two_of_four_in_mask_and_stored_weights():
    mod = _columns({})
    for w, m in ((mod.w1, mod.m1), (mod.w2, mod.m2)):
        assert torch.all(_zeros_per_group(w * m) == 2)
        assert torch.all(_zeros_per_group(w.detach()) == 2)
        # the kept pair is the larger-magnitude pair of the group, ties aside
        kept = (w.detach().abs() * m).reshape(w.shape[0], -1, 4)
        dropped_max = (w.detach().abs() * (1 - m)).reshape(w.shape[0], -1, 4).amax(-1)
        kept_min = kept.masked_fill(kept == 0, float("inf")).amin(-1)
        assert torch.all(kept_min >= dropped_max)


def test_fixed_mask_survives_adamw_steps():
    mod = _columns({}).train()
    masks = mod.m1.clone(), mod.m2.clone()
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        mod(torch.randn(2, 5, 16)).square().sum().backward()
        assert torch.all(mod.w1.grad[mod.m1 == 0] == 0) and torch.all(mod.w2.grad[mod.m2 == 0] == 0)
        opt.step()
    torch.testing.assert_close(mod.m1, masks[0])
    torch.testing.assert_close(mod.m2, masks[1])
    for w in (mod.w1, mod.w2):
        assert torch.all(_zeros_per_group(w.detach()) == 2)


def _columns_reference(mod, x):
    w1, w2 = mod.w1 * mod.m1, mod.w2 * mod.m2
    y = F.gelu(x @ w1.T) @ w2.T  # (B, T, D)
    c, s = mod.inhibit.num_columns, mod.inhibit.column_size
    out = torch.empty_like(y)
    for col in range(c):
        iota = sum(y[..., k * s : (k + 1) * s].mean(-1) * mod.inhibit.inhibition[k, col] for k in range(c))
        out[..., col * s : (col + 1) * s] = torch.relu(y[..., col * s : (col + 1) * s] * (1 - iota[..., None]))
    return out


@pytest.mark.parametrize("mode", ["faithful", "fixed"])
def test_columns_match_reference(mode):
    mod = _columns({"mode": mode, "inhibition_init": 0.3})
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mod(x), _columns_reference(mod, x), atol=1e-5, rtol=1e-5)
    assert torch.all(mod.inhibit.inhibition.diagonal() == 0)


def test_faithful_masks_rows_columns_and_live_fraction():
    mod = _columns({"mode": "faithful"}, shape=(1, 1, 256))  # H = 1024: 256 groups of 4
    rows = mod.m1[:, 0]  # (H,) hidden units kept by M1
    cols = mod.m2[0, :]  # (H,) hidden units kept by M2
    assert torch.all(mod.m1 == rows[:, None]) and torch.all(mod.m2 == cols[None, :])
    assert torch.all(rows.reshape(-1, 4).sum(-1) == 2) and torch.all(cols.reshape(-1, 4).sum(-1) == 2)
    assert not torch.equal(rows, cols)  # drawn independently
    live = (rows * cols).mean().item()
    assert 0.2 < live < 0.3, live  # about 25% (SEEDS.md measured 0.24)
    # straight-through: masked weights get the full gradient although the forward ignores them
    mod(torch.randn(1, 3, 256)).sum().backward()
    assert mod.w1.grad[mod.m1 == 0].abs().sum() > 0


def test_columns_must_tile_the_width():
    info = REGISTRY.get("ffn.cortical_columns")
    with pytest.raises(ComponentError) as err:
        build_example(info, Example({"num_columns": 16, "column_size": 32}, {"x": (1, 2, 48)}))
    assert err.value.param == "column_size"
    assert err.value.fix == "use column_size: 3"


def test_to_semi_structured_refuses_cpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        _columns({}).to_semi_structured()


# -- ffn.prime_masked -----------------------------------------------------------------------


def _prime_mask_loop(rows, cols, primes):
    n = min(rows, cols)
    m = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = any((i - j) % p == 0 for p in primes)
    return m


@pytest.mark.parametrize("hidden,width,primes", [(64, 16, (7, 11, 13, 17, 19)), (12, 20, (2, 3)), (30, 30, (5,))])
def test_prime_mask_matches_loop(hidden, width, primes):
    from physlm_graph.components.ffn.prime_masked import prime_resonance_mask

    got = prime_resonance_mask(hidden, width, primes)
    assert torch.equal(got, _prime_mask_loop(hidden, width, primes))


def _prime(params: dict):
    ex = Example({"hidden_dim": 64, "dropout": 0.0, **params}, {"x": (2, 5, 16)})
    return build_example("ffn.prime_masked", ex)


def test_prime_fixed_masked_weights_get_no_gradient():
    mod = _prime({}).train()
    m = mod.mask.bool()
    assert torch.all(mod.fc.weight[~m] == 0)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        mod(torch.randn(2, 5, 16)).square().sum().backward()
        assert torch.all(mod.fc.weight.grad[~m] == 0) and mod.fc.weight.grad[m].abs().sum() > 0
        opt.step()
    assert torch.all(mod.fc.weight[~m] == 0)


def test_prime_faithful_overwrites_in_training_forward_only():
    mod = _prime({"mode": "faithful"})
    m = mod.mask.bool()
    assert torch.all(mod.fc.weight[~m] == 0)  # zeroed at build, as published
    with torch.no_grad():
        mod.fc.weight.add_(0.5)  # masked entries drift, as after an optimizer step
    x = torch.randn(2, 5, 16)
    drifted = mod.fc.weight.detach().clone()
    want_eval = mod.proj(F.gelu(x @ drifted.T + mod.fc.bias))
    torch.testing.assert_close(mod.eval()(x), want_eval, atol=1e-5, rtol=1e-5)
    assert torch.equal(mod.fc.weight.detach(), drifted)  # eval leaves them alone
    got = mod.train()(x)
    assert torch.all(mod.fc.weight[~m] == 0)  # training forward overwrote them
    want = mod.proj(F.gelu(x @ (drifted * m).T + mod.fc.bias))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert mod.fc.weight.grad[~m].abs().sum() > 0  # masked entries still get gradients (the flag)
