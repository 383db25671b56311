"""A blueprint's ``init:`` scheme keeps what a component initialises on purpose
(``after_init_scheme``, ``physlm_graph/_init.py``): the selective scorer's bias, the prime mask."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from physlm_graph import compile_blueprint

ROOT = Path(__file__).resolve().parents[2]
TINY = (ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml").read_text(encoding="utf-8")


def _blueprint(tmp_path: Path, init: str, attn: str, mlp: str) -> Path:
    text = TINY.replace("attn: {use: attention.causal, in: ln1, num_heads: \"${heads}\"}", attn)
    text = text.replace("mlp:  {use: ffn.mlp, in: ln2, hidden_dim: \"${4 * dim}\"}", mlp)
    path = tmp_path / "bp.yaml"
    path.write_text(text + f"init: {{scheme: {init}}}\n", encoding="utf-8")
    return path


SELECTIVE = "attn: {use: attention.selective, in: ln1, num_heads: \"${heads}\", threshold: 0.5, mode: fixed}"
PRIME = "mlp: {use: ffn.prime_masked, in: ln2, hidden_dim: \"${4 * dim}\", dropout: 0.0}"


@pytest.mark.parametrize("init", ["default", "gpt2"])
def test_selective_scorer_bias_survives_the_init_scheme(tmp_path, init):
    cm = compile_blueprint(_blueprint(tmp_path, init, SELECTIVE, "mlp:  {use: ffn.mlp, in: ln2, hidden_dim: 64}"),
                           device="cpu", seed=0)
    mods = [m for m in cm.module.modules() if type(m).__name__ == "SelectiveAttention"]
    assert len(mods) == 2
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    for m in mods:
        assert m.score_out.bias.item() == pytest.approx(math.log(0.5 / 0.5) + 1.0)
        assert (m.importance(x) > m.threshold).float().mean().item() > 0.95


@pytest.mark.parametrize("init", ["default", "gpt2"])
def test_prime_masked_weights_are_zero_under_the_mask_after_the_init_scheme(tmp_path, init):
    cm = compile_blueprint(_blueprint(tmp_path, init, "attn: {use: attention.causal, in: ln1, num_heads: 4}", PRIME),
                           device="cpu", seed=0)
    mods = [m for m in cm.module.modules() if type(m).__name__ == "PrimeMaskedFeedForward"]
    assert len(mods) == 2
    for m in mods:
        w = m.fc.weight.detach()
        assert torch.all(w[m.mask == 0] == 0)
        assert torch.count_nonzero(w[m.mask == 1]) == int(m.mask.sum())
