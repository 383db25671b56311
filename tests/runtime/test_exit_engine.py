"""Early exit on the decode engine's static caches (runtime/exit_engine.py): the same tokens and
the same exit counts as ``generate_with_exits`` on growing caches, for both KV fills, across the
model's context, and what the engine cannot serve falls back, saying so."""

from __future__ import annotations

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph.runtime.early_exit import generate_with_exits
from physlm_graph.runtime.exit_engine import StaticSegmentExecutor, generate_with_exits_static
from physlm_graph.runtime.generate import generate

from .test_early_exit import PROMPT, blueprint
from .test_speculative_engine import BUILDERS, models  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("kv_fill", ["lazy", "propagate"])
def test_same_tokens_and_exits_as_on_growing_caches(models, name, kv_fill):  # noqa: F811
    cm, _ = models[name]
    for threshold, n in ((0.3, 40), (0.5, 70)):  # 80 tokens > context 64: the re-prefill too
        want, a = generate_with_exits(cm, PROMPT, max_new_tokens=n, rule="top1", threshold=threshold, kv_fill=kv_fill)
        got, b = generate_with_exits_static(cm, PROMPT, max_new_tokens=n, rule="top1", threshold=threshold,
                                            kv_fill=kv_fill)
        assert got == want
        assert b.counts == a.counts and b.kv_fill == a.kv_fill and b.layer_rows == a.layer_rows
        assert sum(b.counts[:-1]) > 3  # exits were taken


def test_never_exiting_is_full_depth_greedy_and_batches_work(models):  # noqa: F811
    cm, plain = models["llama"]
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    got, stats = generate_with_exits_static(cm, x, max_new_tokens=30, rule="top1", threshold=2.0)
    assert torch.equal(got, generate(plain, x, max_new_tokens=30, temperature=0))
    assert stats.counts[:-1] == [0, 0, 0]


def test_the_executor_writes_the_static_buffers(models):  # noqa: F811
    cm, _ = models["gpt2"]
    ex = StaticSegmentExecutor(cm, max_len=32, rule="top1", threshold=0.3)
    ex.prefill(torch.tensor([PROMPT]))
    assert ex.static is not None and len(ex.static._kv) == 4  # one pair per attention
    assert all(ex.ctx.get(m) is None for m in cm.module.modules())  # no growing cache in the context
    with pytest.raises(PhysLMError, match="positions 0..41 do not fit the engine's max_len 32"):
        ex.prefill(torch.tensor([PROMPT * 4 + [1, 2]]))
    with pytest.raises(PhysLMError, match="max_len 65 is longer than the model's context 64"):
        StaticSegmentExecutor(cm, max_len=65)


def test_nodes_off_the_static_path_run_the_old_executor_and_say_so(capsys):
    d = blueprint(layers=2, every=1, block="trunk")
    d["blocks"]["gpt_block"]["nodes"]["attn"] = {"use": "memory.episodic", "in": "ln1"}
    cm = compile_blueprint(d)
    with pytest.raises(PhysLMError, match="keep caches that grow: trunk.0.attn"):
        StaticSegmentExecutor(cm, max_len=32)
    want, _ = generate_with_exits(cm, PROMPT, max_new_tokens=6, rule="top1", threshold=0.3)
    got, _ = generate_with_exits_static(cm, PROMPT, max_new_tokens=6, rule="top1", threshold=0.3)
    assert got == want
    assert "decode engine: early exit with nodes off its static path (trunk.0.attn (memory.episodic)" in \
        capsys.readouterr().err
