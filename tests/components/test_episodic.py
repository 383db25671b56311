"""memory.episodic (Brain-Inspired GPT V2 EpisodicMemoryModule) against plain references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from physlm_graph import REGISTRY, Example, decoding
from physlm_graph.testing import build_example

D = 8


def build(**params) -> torch.nn.Module:
    base = {"memory_size": 12, "top_k": 3}
    return build_example(REGISTRY.get("memory.episodic"), Example({**base, **params}, {"x": (2, 6, D)}))


def lstm_reference(lstm: torch.nn.LSTM, r: torch.Tensor) -> torch.Tensor:
    """The LSTM equations step by step (gates in PyTorch's i, f, g, o order)."""
    B, T, _ = r.shape
    inp = r
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        h = torch.zeros(B, lstm.hidden_size)
        c = torch.zeros(B, lstm.hidden_size)
        outs = []
        for t in range(T):
            i, f, g, o = (inp[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        inp = torch.stack(outs, 1)
    return inp


def read_reference(m, x: torch.Tensor) -> torch.Tensor:
    """Token by token: score every slot, keep the top k, softmax, mix values; LSTM; gate."""
    B, T, _ = x.shape
    r = torch.empty(B, T, D)
    for b in range(B):
        for t in range(T):
            q = m.query.weight @ x[b, t]
            scores = [(float(q @ m.keys[s]) / math.sqrt(D), s) for s in range(m.keys.shape[0])]
            top = sorted(scores, reverse=True)[: m.top_k]
            w = torch.softmax(torch.tensor([v for v, _ in top]), 0)
            r[b, t] = sum(w[j] * m.values[s] for j, (_, s) in enumerate(top))
    return x + m.gate(x) * lstm_reference(m.lstm, r)


def write_reference(m, h: torch.Tensor, pos: torch.Tensor):
    """The stated rule, slot by slot: keep prod(1 - alpha), blend toward the alpha-weighted mean."""
    keys, values = m.keys.clone(), m.values.clone()
    hs = h[:, pos].reshape(-1, D)
    kn, vn = hs @ m.key_proj.weight.T, hs @ m.value_proj.weight.T
    hits: dict[int, list[tuple[float, int]]] = {}
    for j in range(hs.shape[0]):
        cos = torch.stack([F.cosine_similarity(kn[j], m.keys[s], dim=0) for s in range(keys.shape[0])])
        sim, slots = cos.topk(m.write_slots)
        for c, s in zip(sim.tolist(), slots.tolist()):
            hits.setdefault(s, []).append((float(m.eta) * torch.sigmoid(torch.tensor(c)).item(), j))
    for s, lst in hits.items():
        keep = math.prod(1 - a for a, _ in lst)
        mass = sum(a for a, _ in lst)
        for store, new in ((keys, kn), (values, vn)):
            target = sum(a * new[j] for a, j in lst) / mass
            store[s] = keep * store[s] + (1 - keep) * target
    return keys, values


def test_faithful_read_matches_loop_reference():
    m = build(mode="faithful", write_positions=0).eval()
    with torch.no_grad():
        m.values.normal_()  # larger values: the read matters
        x = torch.randn(2, 6, D)
        torch.testing.assert_close(m(x), read_reference(m, x), atol=1e-5, rtol=0)


def test_faithful_is_identity_in_training_and_not_checkpointed():
    m = build(mode="faithful").train()
    x = torch.randn(2, 6, D)
    keys = m.keys.clone()
    assert torch.equal(m(x), x)
    assert torch.equal(m.keys, keys), "faithful must not write in training"
    sd = m.state_dict()
    assert "keys" not in sd and "values" not in sd


def test_faithful_write_matches_reference_and_follows_read():
    m = build(mode="faithful", write_positions=4, write_rate=0.3).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        m.values.normal_()
        want_out = read_reference(m, x)
        torch.manual_seed(5)
        pos = torch.randperm(6)[:4]
        want_k, want_v = write_reference(m, x, pos)
        torch.manual_seed(5)
        out = m(x)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)  # read before write
    torch.testing.assert_close(m.keys, want_k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.values, want_v, atol=1e-6, rtol=1e-5)


def test_single_write_equals_published_sequential_blend():
    # one written vector hits write_slots distinct slots: the published loop, exactly
    m = build(mode="faithful", write_positions=1).eval()
    x = torch.randn(1, 6, D)
    with torch.no_grad():
        torch.manual_seed(0)
        pos = torch.randperm(6)[:1]
        k = m.key_proj(x[0, pos[0]])
        v = m.value_proj(x[0, pos[0]])
        keys, values = m.keys.clone(), m.values.clone()
        sim, slots = F.cosine_similarity(k[None], keys, dim=-1).topk(5)
        for c, s in zip(sim, slots):
            a = m.eta * torch.sigmoid(c)
            keys[s] = (1 - a) * keys[s] + a * k
            values[s] = (1 - a) * values[s] + a * v
        torch.manual_seed(0)
        m(x)
    torch.testing.assert_close(m.keys, keys)
    torch.testing.assert_close(m.values, values)


def test_fixed_state_is_checkpointed_and_written_in_training_only():
    m = build(write_positions=3)
    assert {"keys", "values"} <= set(m.state_dict())
    x = torch.randn(2, 6, D)
    m.eval()
    keys = m.keys.clone()
    m(x)
    assert torch.equal(m.keys, keys), "fixed writes in eval only with write_in_eval"
    m.train()
    m(x)
    assert not torch.equal(m.keys, keys)
    fresh = build(write_positions=3)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.keys, m.keys) and torch.equal(fresh.values, m.values)
    w = build(write_positions=3, write_in_eval=True).eval()
    keys = w.keys.clone()
    w(x)
    assert not torch.equal(w.keys, keys)


def test_fixed_gradients_reach_read_params_not_write_params():
    m = build(write_positions=3).train()
    x = torch.randn(2, 6, D, requires_grad=True)
    m(x).square().sum().backward()  # the write ran after the read: backward must still work
    for name, p in m.named_parameters():
        got = p.grad is not None and bool(torch.any(p.grad != 0))
        assert got == (name.split(".")[0] in ("query", "lstm", "gate")), name
    assert x.grad is not None


@pytest.mark.parametrize("mode,train", [("fixed", True), ("fixed", False), ("faithful", False)])
def test_causal_within_a_forward_with_writes(mode, train):
    params = {"mode": mode, "write_positions": 6}
    if mode == "fixed" and not train:
        params["write_in_eval"] = True
    m = build(**params).train(train)
    x = torch.randn(2, 6, D)
    y = x.clone()
    y[:, 3:] = torch.randn(2, 3, D) * 3
    torch.manual_seed(0)
    a = copy.deepcopy(m)(x)
    torch.manual_seed(0)
    b = copy.deepcopy(m)(y)
    torch.testing.assert_close(a[:, :3], b[:, :3])


def test_cached_decode_matches_full_sequence():
    m = build().eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        full = m(x)
        with decoding() as ctx:
            parts = []
            for start, stop in [(0, 3), (3, 4), (4, 6)]:
                ctx.offset = start
                parts.append(m(x[:, start:stop]))
    torch.testing.assert_close(torch.cat(parts, 1), full)


def test_params_checks():
    P = REGISTRY.get("memory.episodic").params
    with pytest.raises(ValidationError, match="must not exceed memory_size"):
        P.model_validate({"memory_size": 4, "top_k": 10})
    with pytest.raises(ValidationError, match="write_in_eval is for mode: fixed"):
        P.model_validate({"mode": "faithful", "write_in_eval": True})
    assert P.model_validate({}).mode == "fixed"


def test_meta_forward():
    m = build_example(REGISTRY.get("memory.episodic"), Example({"memory_size": 12, "top_k": 3}, {"x": (2, 6, D)}), "meta")
    m.train()
    assert m(torch.empty(2, 6, D, device="meta")).shape == (2, 6, D)


@pytest.mark.parametrize("mode", ["fixed", "faithful"])
def test_trains_and_writes_under_cpu_bf16_autocast(mode):
    """The write blends in float32 whatever the autocast (index_add takes one dtype): a bf16
    training step of the default (fixed) mode runs, writes the store and gets gradients."""
    torch.manual_seed(0)
    mod = build(mode=mode, write_positions=4).train(mode == "fixed")
    before = mod.keys.detach().clone()
    x = torch.randn(2, 6, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()
    assert mod.keys.dtype == torch.float32 and not torch.equal(mod.keys.detach(), before)
