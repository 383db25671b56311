"""QLLM embed.prime_hilbert, memory.hcw and head.pre_manifest against plain references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from physlm_graph import REGISTRY, Example, decoding
from physlm_graph.testing import build_example


def build(name: str, params: dict, inputs: dict, seed: int = 0) -> torch.nn.Module:
    return build_example(REGISTRY.get(name), Example(params, inputs), seed=seed)


# -- embed.prime_hilbert ---------------------------------------------------------------------


def prime_hilbert_reference(m, tokens: torch.Tensor, primes: list[int], max_seq_len: int, offset: int = 0):
    """Token by token, channel by channel, in float64."""
    B, T = tokens.shape
    out = torch.empty(B, T, m.enc.out_features, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = min(t + offset, max_seq_len - 1)
            e = m.base.weight[tokens[b, t]].double()
            parts = []
            for proj, p in zip(m.proj, primes):
                code = [math.sin(n * 10000.0 ** (-k / p) + (n % p) / p) for k in range((p + 1) // 2)]
                code += [math.cos(n * 10000.0 ** (-k / p) + (n % p) / p) for k in range(p // 2)]
                parts.append(proj.weight.double() @ e + proj.bias.double() + torch.tensor(code, dtype=torch.float64))
            x = m.enc.weight.double() @ torch.cat(parts) + m.enc.bias.double()
            out[b, t] = F.layer_norm(x, x.shape, m.ln.weight.double(), m.ln.bias.double())
    return out


@pytest.mark.parametrize("primes,max_seq_len,T", [([7, 11, 13, 17, 19], 1024, 9), ([2, 3, 5], 6, 10)])
def test_prime_hilbert_matches_loop_reference(primes, max_seq_len, T):
    params = {"vocab_size": 20, "embed_dim": 12, "base_dim": 8, "primes": primes, "max_seq_len": max_seq_len}
    m = build("embed.prime_hilbert", params, {"tokens": ((2, T), torch.long)})
    tokens = torch.randint(0, 20, (2, T))
    got = m(tokens)
    assert got.shape == (2, T, 12)
    torch.testing.assert_close(got.double(), prime_hilbert_reference(m, tokens, primes, max_seq_len), atol=1e-5, rtol=0)


def test_prime_hilbert_decode_offset_matches_full_sequence():
    params = {"vocab_size": 20, "embed_dim": 12, "max_seq_len": 7}
    m = build("embed.prime_hilbert", params, {"tokens": ((1, 10), torch.long)})
    tokens = torch.randint(0, 20, (1, 10))
    full = m(tokens)
    with decoding() as ctx:
        chunks = []
        for start, stop in [(0, 4), (4, 5), (5, 10)]:
            ctx.offset = start
            chunks.append(m(tokens[:, start:stop]))
    torch.testing.assert_close(torch.cat(chunks, 1), full)
    # positions past max_seq_len - 1 share the last code
    same = torch.full((1, 10), 3)
    out = m(same)
    torch.testing.assert_close(out[:, 6], out[:, 9])
    assert not torch.allclose(out[:, 5], out[:, 6])


def test_prime_hilbert_rejects_bad_primes():
    with pytest.raises(ValidationError):
        REGISTRY.get("embed.prime_hilbert").params.model_validate({"vocab_size": 5, "embed_dim": 4, "primes": [0, 3]})


# -- memory.hcw -------------------------------------------------------------------------------


def hcw_reference(m, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
    """Materialised tensors, token by token."""
    keys = m.memory_keys / m.memory_keys.norm(dim=-1, keepdim=True)
    values = m.memory_values + (state if state is not None else 0)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            q = m.key_norm(m.key_net(x[b, t]))
            a = torch.softmax(keys @ q / math.sqrt(keys.shape[1]), dim=0)
            out[b, t] = x[b, t] + 0.1 * m.adapter(a @ values)
    return out


@pytest.mark.parametrize("update", ["none", "ema"])
def test_hcw_matches_reference(update):
    m = build("memory.hcw", {"memory_size": 8, "memory_key_dim": 16, "update": update}, {"x": (2, 5, 12)}).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hcw_reference(m, x), atol=1e-5, rtol=0)


def test_hcw_none_is_static():
    m = build("memory.hcw", {"memory_size": 8, "memory_key_dim": 16}, {"x": (2, 5, 12)})
    assert not hasattr(m, "memory_state") and list(dict(m.named_buffers())) == []
    with pytest.raises(ValidationError, match="write_rate has no effect"):
        REGISTRY.get("memory.hcw").params.model_validate({"write_rate": 0.1})


def test_hcw_ema_write_rule_and_checkpoint():
    p = {"memory_size": 6, "memory_key_dim": 8, "update": "ema", "write_rate": 0.2, "dropout": 0.0}
    m = build("memory.hcw", p, {"x": (2, 5, 12)})
    assert "memory_state" in m.state_dict()
    x = torch.randn(2, 5, 12)
    m.eval()
    m(x)
    assert torch.all(m.memory_state == 0), "eval forwards must not write"
    m.train()
    state0 = m.memory_state.clone()
    with torch.no_grad():
        keys = F.normalize(m.memory_keys, dim=-1)
        q = m.key_norm(m.key_net(x))
        a = torch.softmax(q @ keys.T / math.sqrt(8), dim=-1).reshape(-1, 6)
        values = m.memory_values + state0
        want_out = hcw_reference(m, x, state0)
    out = m(x)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)  # the read used the pre-write state
    xs = x.reshape(-1, 12)
    mass = a.sum(0)
    want = state0.clone()
    for s in range(6):  # the stated rule, slot by slot
        mean = (a[:, s : s + 1] * xs).sum(0) / mass[s]
        want[s] += 0.2 * (mass[s] / mass.max()) * (mean - values[s])
    torch.testing.assert_close(m.memory_state, want, atol=1e-6, rtol=1e-5)
    # the state travels with the checkpoint
    fresh = build("memory.hcw", p, {"x": (2, 5, 12)})
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.memory_state, m.memory_state)


def test_hcw_ema_training_forward_is_causal():
    p = {"memory_size": 6, "memory_key_dim": 8, "update": "ema", "dropout": 0.0}
    m = build("memory.hcw", p, {"x": (2, 8, 12)}).train()
    x = torch.randn(2, 8, 12)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, 12) * 3
    a, b = copy.deepcopy(m)(x), copy.deepcopy(m)(y)
    torch.testing.assert_close(a[:, :5], b[:, :5])


# -- head.pre_manifest ------------------------------------------------------------------------


def pre_manifest_reference(m, h: torch.Tensor, K: int, eps: float) -> torch.Tensor:
    E, bv = m.embedding, m.vocab_bias
    q = m.query(m.ln(h))
    for _ in range(K):
        logits = q @ E.T + bv
        p = torch.softmax(logits, -1)
        ent = -(p * torch.log(p + 1e-10)).sum(-1)
        if (ent < eps).all():
            break
        q = q + m.out(p @ E)
    return q @ E.T + bv


@pytest.mark.parametrize("K", [0, 1, 5])
def test_pre_manifest_matches_reference(K):
    m = build("head.pre_manifest", {"vocab_size": 30, "iterations": K}, {"h": (2, 6, 16)}).eval()
    h = torch.randn(2, 6, 16)
    with torch.no_grad():
        got = m(h)
        assert got.shape == (2, 6, 30)
        torch.testing.assert_close(got, pre_manifest_reference(m, h, K, 0.05), atol=1e-5, rtol=0)


def test_pre_manifest_halting():
    # a threshold above log V: every token halts at t = 0, so the logits are q_0 E^T + b_v
    m = build("head.pre_manifest", {"vocab_size": 30, "entropy_threshold": 10.0}, {"h": (2, 6, 16)}).eval()
    with torch.no_grad():
        m.vocab_bias.normal_()
        h = torch.randn(2, 6, 16)
        torch.testing.assert_close(m(h), m.query(m.ln(h)) @ m.embedding.T + m.vocab_bias)
        torch.testing.assert_close(m(h), pre_manifest_reference(m, h, 5, 10.0))
        # sharp distributions: the published check stops once all tokens are confident
        m.embedding.mul_(200.0)
        m.entropy_threshold = 0.5
        torch.testing.assert_close(m(h), pre_manifest_reference(m, h, 5, 0.5), atol=1e-3, rtol=1e-5)
        assert not torch.allclose(m(h), pre_manifest_reference(m, h, 5, 0.0), atol=1e-3, rtol=1e-5)
    meta = build_example(REGISTRY.get("head.pre_manifest"), Example({"vocab_size": 30}, {"h": (2, 6, 16)}), "meta")
    assert meta(torch.empty(2, 6, 16, device="meta")).shape == (2, 6, 30)


def test_pre_manifest_dropout_acts_in_training():
    m = build("head.pre_manifest", {"vocab_size": 30, "dropout": 0.5}, {"h": (2, 6, 16)}).train()
    h = torch.randn(2, 6, 16)
    torch.manual_seed(0)
    a = m(h)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(h))
