"""Incremental decoding equals the full forward.

For every seed mixer that declares an incremental decode kind (``stateless``, ``cached`` or
``recurrent``) and every one of its examples: run the whole sequence at once, then run it
inside ``decoding()`` as a prompt prefill followed by one token at a time (``ctx.offset`` set to
each chunk's start), and compare the outputs at every position. Then, for each fixed seed
blueprint whose nodes all decode, cached greedy generation equals recomputing the context.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from physlm_graph import REGISTRY, compile_blueprint
from physlm_graph._context import DecodeContext, decoding
from physlm_graph.runtime.generate import can_cache, generate
from physlm_graph.testing import as_outputs, build_example, make_inputs

ROOT = Path(__file__).resolve().parents[2]


# The seed mixers this file covers (the others that decode have their own tests).
MIXERS = ("attention.dendritic", "attention.selective", "attention.holographic", "attention.gravity",
          "attention.resonance", "topology.processor", "memory.episodic", "adaptive.act")


def _decode_cases() -> list:
    cases = []
    for info in REGISTRY:
        if info.name not in MIXERS:
            continue
        for i, ex in enumerate(info.examples):
            params = info.params.model_validate(ex.params)
            if info.decode_kind(params) in ("stateless", "cached", "recurrent"):
                cases.append(pytest.param(info, i, id=f"{info.name}[{i}]"))
    return cases


def decode_in_chunks(mod: torch.nn.Module, inputs: list[torch.Tensor], seq: int, starts: list[int]) -> list[torch.Tensor]:
    """The module run inside ``decoding()`` on the chunks [starts[i], starts[i+1]) of the
    sequence axis (dim 1) of every input of length ``seq``; outputs concatenated along dim 1
    (outputs without a sequence axis are dropped)."""
    ctx = DecodeContext()
    pieces: list[list[torch.Tensor]] = []
    bounds = list(zip(starts, starts[1:] + [seq]))
    with decoding(ctx):
        for a, b in bounds:
            ctx.offset = a
            chunk = [x.narrow(1, a, b - a) if x.dim() >= 2 and x.shape[1] == seq else x for x in inputs]
            pieces.append([o for o in as_outputs(mod(*chunk)) if o.dim() >= 2 and o.shape[1] == b - a])
    return [torch.cat(parts, dim=1) for parts in zip(*pieces)]


@pytest.mark.parametrize("info,i", _decode_cases())
def test_one_token_decode_equals_full_forward(info, i):
    ex = info.examples[i]
    mod = build_example(info, ex)
    mod.eval()
    inputs = make_inputs(ex, seed=1)
    seq = next(x.shape[1] for x in inputs if x.dim() >= 2)
    with torch.no_grad():
        full = [o for o in as_outputs(mod(*inputs)) if o.dim() >= 2 and o.shape[1] == seq]
        prefill = max(1, seq // 3)
        for starts in (list(range(seq)), [0] + list(range(prefill, seq)), [0, prefill, seq - 2]):
            got = decode_in_chunks(mod, inputs, seq, starts)
            assert len(got) == len(full)
            for a, b in zip(got, full):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"chunks {starts}: {m}")


# Tiny versions of the fixed seed blueprints (2 layers, small widths); the context is long enough
# that 512 generated tokens never crop it.
TINY = {
    "brain-gpt-v1-small-fixed": {"vocab": 97, "dim": 32, "heads": 4, "layers": 2, "context": 640, "dendrites": 2,
                                 "columns": 4, "column_size": 8},
    "brain-gpt-v2-fixed": {"vocab": 97, "dim": 64, "heads": 2, "layers": 2, "context": 640, "dropout": 0.0},
    "holographic-v2-fixed": {"vocab": 97, "dim": 32, "heads": 4, "layers": 2, "hidden": 64, "context": 640,
                             "dropout": 0.0, "experts": 2},
    "ngt-25m-fixed": {"vocab": 97, "dim": 32, "coord": 8, "heads": 4, "layers": 2, "hidden": 64, "context": 640,
                      "dropout": 0.0},
    "qllm-fixed": {"vocab": 97, "dim": 32, "heads": 4, "layers": 2, "hidden": 64, "context": 640, "base_dim": 8,
                   "memory": 8, "dropout": 0.0},
}


def tiny_seed(name: str):
    return compile_blueprint(ROOT / "blueprints" / "seeds" / f"{name}.yaml",
                             overrides={f"params.{k}": v for k, v in TINY[name].items()}, seed=0)


# The fixed seeds every node of which (that the logits depend on) decodes incrementally.
DECODING = ["brain-gpt-v1-small-fixed", "brain-gpt-v2-fixed", "ngt-25m-fixed", "holographic-v2-fixed", "qllm-fixed"]


def _check_cached_equals_full(name: str, n: int) -> None:
    cm = tiny_seed(name)
    assert can_cache(cm)
    prompt = torch.randint(0, TINY[name]["vocab"], (1, 7), generator=torch.Generator().manual_seed(3))
    cached = generate(cm, prompt, max_new_tokens=n, temperature=0, use_cache=True)
    full = generate(cm, prompt, max_new_tokens=n, temperature=0, use_cache=False)
    assert cached.tolist() == full.tolist()


@pytest.mark.parametrize("name", DECODING)
def test_cached_greedy_equals_full_recompute(name):
    _check_cached_equals_full(name, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODING)
def test_cached_greedy_equals_full_recompute_512(name):
    _check_cached_equals_full(name, 512)


def test_holographic_fixed_decode_carries_its_memory_past_one_scan_chunk():
    """A 150-token sequence (the full forward's causal mean spans several 64-step chunks of
    the recurrence) prefilled for 100 tokens, then one token at a time."""
    from physlm_graph.components.attention.holographic import HolographicAttention

    torch.manual_seed(0)
    mod = HolographicAttention(embed_dim=32, num_heads=4, dropout=0.0, mode="fixed").eval()
    x = torch.randn(2, 150, 32)
    with torch.no_grad():
        full = mod(x)
        got = decode_in_chunks(mod, [x], 150, [0] + list(range(100, 150)))
    torch.testing.assert_close(got[0], full, atol=1e-5, rtol=1e-4)


def test_resonance_fixed_decode_keeps_per_row_halting():
    """Rows that halt at different iterations in the full forward halt at the same ones when
    decoded one at a time."""
    from physlm_graph.components.attention.resonance import ResonanceAttention

    torch.manual_seed(0)
    mod = ResonanceAttention(embed_dim=16, num_heads=2, max_iterations=6, convergence_threshold=0.999,
                             entropy_threshold=0.3, dropout=0.0, mode="fixed").eval()
    x = torch.randn(2, 24, 16) * 3
    with torch.no_grad():
        full = mod(x)[0]
        assert mod.last_iterations > 1  # rows did not all halt at once
        got = decode_in_chunks(mod, [x], 24, [0] + list(range(9, 24)))
    torch.testing.assert_close(got[0], full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["attention.selective", "topology.processor", "adaptive.act"])
def test_a_faithful_mode_that_cannot_decode_says_why(name):
    info = REGISTRY.get(name)
    assert info.decode_kind(info.params.model_validate({"mode": "faithful", **(
        {"num_heads": 2} if name == "attention.selective" else {"hidden_dim": 8} if name == "adaptive.act" else {})})) == "none"
    assert info.decode_kind(info.params.model_validate({"mode": "fixed", **(
        {"num_heads": 2} if name == "attention.selective" else {"hidden_dim": 8} if name == "adaptive.act" else {})})) != "none"
    assert "cannot decode incrementally" in " ".join(info.doc.split())  # shown by `physlm-graph components NAME`


def test_append_cache_grows_and_keeps_every_chunk():
    from physlm_graph.components._decode_cache import AppendCache

    cache = AppendCache(2, 1)
    k = torch.randn(2, 3, 300, 4)
    sel = torch.rand(2, 300) > 0.5
    bounds = [0, 70, 71, 72, 200, 201] + list(range(202, 301))  # a long prefill, then past two regrowths
    for a, b in zip(bounds, bounds[1:]):
        got_k, got_sel = cache.extend(k[:, :, a:b], sel[:, a:b])
        assert torch.equal(got_k, k[:, :, :b]) and torch.equal(got_sel, sel[:, :b])
    assert cache.truncate(50).extend(k[:, :, 50:51], sel[:, 50:51])[0].shape[2] == 51


def test_build_reports_each_nodes_decode_kind(capsys):
    import json

    from physlm_graph.cli import main

    seed = str(ROOT / "blueprints" / "seeds" / "holographic-v2.yaml")  # the faithful topology cannot decode
    assert main(["build", seed, "--json", "--set", "layers=1"]) == 0
    nodes = {n["node"]: n["decode"] for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert nodes["trunk.0.attn"] == "cached" and nodes["trunk.0.topo"] == "none"
    assert set(nodes.values()) <= {"stateless", "cached", "recurrent", "none"}
    assert main(["build", seed, "--set", "layers=1"]) == 0
    out = capsys.readouterr().out
    assert "decode" in out and any("trunk.0.topo" in line and "none" in line for line in out.splitlines())
