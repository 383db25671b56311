"""docs/hugging-face.md's worked example runs as written: its Python block, its hybrid.yaml and
every physlm-graph command of its bash block, in order, on a 4-layer random Llama (with a
tokenizer.json, as a real folder has) and a small text."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from physlm_graph.cli import main  # noqa: E402
from physlm_graph.runtime.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
DOC = (ROOT / "docs" / "hugging-face.md").read_text()
SECTION = DOC[DOC.index("## Worked example: import, hybridize, train, diff, export"):]
EXIT = {"import": 0, "diff": 1, "train": 0, "export": 0}  # diff, like diff(1): 1 when the models differ


def _block(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", SECTION, re.S)
    assert len(blocks) == 1, f"the section has {len(blocks)} {lang} blocks"
    return blocks[0]


def _setup(root: Path) -> None:
    from physlm_graph.runtime.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-5)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "hf" / "llama")
    ByteTokenizer().to_hf(root / "hf" / "llama")  # tokenizer.json: import carries it into the checkpoint
    words = ["to", "be", "or", "not", "the", "question", "whether", "tis", "nobler"]
    g = torch.Generator().manual_seed(0)
    (root / "text.txt").write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (4000,), generator=g)))


def _run(root: Path, monkeypatch, capsys, train_extra: list[str]) -> str:
    monkeypatch.chdir(root)
    _setup(root)
    scope: dict = {}
    exec(compile(_block("python"), "hugging-face.md", "exec"), scope)  # noqa: S102 (our own doc)
    assert scope["cm"].name == "llama-import"
    (root / "hybrid.yaml").write_text(_block("yaml"))
    commands = [shlex.split(line) for line in _block("bash").strip().splitlines()]
    assert [c[1] for c in commands] == ["import", "diff", "train", "export"]
    for cmd in commands:
        assert cmd[0] == "physlm-graph"
        assert main(cmd[1:] + (train_extra if cmd[1] == "train" else [])) == EXIT[cmd[1]], " ".join(cmd)
    out = capsys.readouterr()
    text = " ".join(out.out.split())  # rich wraps long notes
    assert "trunk.*.ssd (x2)" in text and "2 changed, 2 added, 2 removed" in text
    assert "nodes start fresh: trunk.1.ssd, trunk.3.ssd" in text and "4 checkpoint tensors unused" in text
    used = json.loads((root / "runs" / "hybrid" / "last" / "tokenizer" / "physlm_tokenizer.json").read_text())
    assert used["kind"] == "hf" and used["name"] == "llama"  # the checkpoint's tokenizer, not the default bytes
    assert "as model_type physlm" in out.err
    record = json.loads((root / "runs" / "hybrid" / "init_from.json").read_text())
    assert record["fresh"] == ["trunk.1.ssd", "trunk.3.ssd"] and len(record["unused"]) == 4
    exported = load_checkpoint(root / "export" / "hybrid")  # the exported folder is a physlm checkpoint
    # a tokenizer with no end-of-text token gains <|endoftext|> at the first free id (BOS/EOS/PAD)
    assert exported.tokenizer is not None and exported.tokenizer.vocab_size == 257
    assert exported.tokenizer.hf.token_to_id("<|endoftext|>") == 256 == exported.tokenizer.eos_id
    assert "trunk.1.ssd" in exported.model.graph["nodes"] and "trunk.1.attn" not in exported.model.graph["nodes"]
    return text


def test_the_worked_example_runs_with_a_short_training(tmp_path, monkeypatch, capsys):
    """Every command as written; the training is cut to 3 steps and 2 validation batches (later
    options win); the slow test below runs it exactly."""
    text = _run(tmp_path, monkeypatch, capsys, ["--steps", "3", "--set", "train.eval_iters=2"])
    assert "done: 3 steps" in text


@pytest.mark.slow
def test_the_worked_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = _run(tmp_path, monkeypatch, capsys, [])
    assert "done: 50 steps" in text
