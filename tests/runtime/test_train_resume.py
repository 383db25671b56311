"""The training loop: exact resume, metrics, NaN policies, vocabulary fitting, the CLI commands."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from physlm_graph import CheckpointError, TrainingError
from physlm_graph.runtime.checkpoint import load_checkpoint
from physlm_graph.cli import main
from physlm_graph.runtime.generate import generate
from physlm_graph.runtime.optim import lr_at
from physlm_graph.runtime.train import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = ROOT / "blueprints" / "baby-gpt.yaml"
SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TINY = {"params.layers": 1, "params.dim": 32, "params.heads": 2, "params.context": 32, "train.seq_len": 32,
        "params.dropout": 0.1}
FAST = dict(batch_size=4, eval_every=50, eval_iters=2, log_every=10, warmup=20, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shakespeare-slice.txt"
    if SHAKESPEARE.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    else:  # the project must not need the shared data at run time
        path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n"
                        "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 200, encoding="utf-8")
    return path


def _run(out: Path, data: Path, **kw):
    return train(BLUEPRINT, data=str(data), overrides=TINY, out_dir=out, device="cpu", **{**FAST, **kw})


def test_resume_is_bit_identical(tmp_path, text_file):
    straight = _run(tmp_path / "a", text_file, steps=200)
    first = _run(tmp_path / "b", text_file, steps=200, stop_after=100)
    assert first["steps"] == 100
    second = _run(tmp_path / "b", text_file, steps=200, resume=True)
    assert second["steps"] == 200 and straight["steps"] == 200
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight["best_val_loss"] == second["best_val_loss"]
    sa = json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())
    sb = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())
    assert sa["batcher"] == sb["batcher"] and sa["rng"] == sb["rng"] and sa["tokens_seen"] == sb["tokens_seen"]


def test_metrics_and_checkpoints(tmp_path, text_file):
    result = _run(tmp_path / "r", text_file, steps=20, eval_every=10)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20]
    assert {"step", "loss", "lr", "tokens_per_s", "val_loss", "grad_norm"} <= set(lines[-1])
    assert result["best"] and result["last"] and math.isfinite(result["best_val_loss"])
    ck = load_checkpoint(tmp_path / "r")
    assert ck.trainer_state["step"] == 20
    # vocab was fitted to the slice's characters, and the stored blueprint says so
    assert ck.config["vocab_size"] == ck.tokenizer.vocab_size == yaml.safe_load((ck.path / "blueprint.yaml").read_text())["params"]["vocab"]


def test_existing_run_needs_resume(tmp_path, text_file):
    _run(tmp_path / "r", text_file, steps=2)
    with pytest.raises(TrainingError, match="the output folder already holds a run"):
        _run(tmp_path / "r", text_file, steps=4)
    with pytest.raises(CheckpointError, match="--resume: no checkpoint to resume"):
        _run(tmp_path / "empty", text_file, steps=4, resume=True)


class _NaNAt(Trainer):
    """Returns a NaN loss at the given (1-based) steps."""

    bad: tuple[int, ...] = ()

    def compute_loss(self, out, y):
        loss, parts = super().compute_loss(out, y)
        return (loss * float("nan"), parts) if self.step + 1 in self.bad else (loss, parts)


def test_nan_stop_names_the_step_and_keeps_the_last_checkpoint(tmp_path, text_file):
    t = _NaNAt(BLUEPRINT, data=str(text_file), overrides=TINY, out_dir=tmp_path / "r", steps=10, save_every=2,
               device="cpu", **FAST)
    t.bad = (5,)
    with pytest.raises(TrainingError, match=r"the loss is nan at step 5; the last good checkpoint is kept in"):
        t.fit()
    assert load_checkpoint(tmp_path / "r").trainer_state["step"] == 4


def test_nan_skip_until_max_skips(tmp_path, text_file):
    t = _NaNAt(BLUEPRINT, data=str(text_file), overrides=TINY, out_dir=tmp_path / "r", steps=8, device="cpu",
               nan_policy="skip", max_skips=2, **FAST)
    t.bad = (3, 4)
    assert t.fit()["skipped"] == 2
    t = _NaNAt(BLUEPRINT, data=str(text_file), overrides=TINY, out_dir=tmp_path / "s", steps=8, device="cpu",
               nan_policy="skip", max_skips=2, **FAST)
    t.bad = (3, 4, 6)
    with pytest.raises(TrainingError, match="at step 6: 3 batches skipped, more than max_skips 2"):
        t.fit()


def test_a_model_without_a_vocab_param_must_fit_the_tokenizer(tmp_path, text_file):
    doc = yaml.safe_load(BLUEPRINT.read_text())
    doc = copy.deepcopy(doc)
    del doc["params"]["vocab"]
    doc["nodes"]["tok"]["vocab_size"] = 10
    doc["nodes"]["head"]["vocab_size"] = 10
    doc["train"]["fit_vocab"] = False  # nothing to fit: there is no params.vocab
    with pytest.raises(TrainingError, match="the model's logits cover 10 ids, but tokenizer 'chars' has \\d+"):
        train(doc, data=str(text_file), overrides=TINY, out_dir=tmp_path / "r", steps=2, device="cpu", **FAST)


def test_unknown_training_option(tmp_path, text_file):
    with pytest.raises(TrainingError, match="unknown training option"):
        _run(tmp_path / "r", text_file, steps=2, bogus=1)


def test_lr_schedule_is_a_function_of_the_step():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=10, steps=100)
    assert lr_at(0, **kw) == pytest.approx(1e-3 / 11)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(100, **kw) == pytest.approx(1e-4)
    assert lr_at(55, **kw) == pytest.approx(5.5e-4)
    assert lr_at(50, **kw, schedule="constant") == 1e-3
    assert lr_at(55, **kw, schedule="linear") == pytest.approx(5.5e-4)
    assert lr_at(50, lr=1e-3, min_lr=None, warmup=0, steps=50) == pytest.approx(1e-4)


def test_cli_train_generate_eval(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    args = ["train", str(BLUEPRINT), "--data", str(text_file), "--steps", "4", "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--no-progress", "--set", "train.eval_every=2", "--set", "train.eval_iters=1"]
    args += [f"--set={k}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "1", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["new_tokens"] == 5 and gen["cache"] is True and len(gen["completion"]) == 5
    assert main(["eval", str(out), "--data", str(text_file), "--json", "--batch-size", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_scored"] == len(text_file.read_text()) - 1 and report["perplexity"] > 1
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(text_file)]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


def _eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: the same tracing (and graph breaks), no codegen."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()


def test_compiled_training_reports_no_graph_breaks(tmp_path, text_file, monkeypatch, capsys):
    _eager_compile(monkeypatch)
    result = _run(tmp_path / "r", text_file, steps=3, eval_every=3, log_every=1, compile=True)
    assert result["compile"] == {"graph_breaks": 0, "recompile_limit_hits": 0}
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["graph_breaks"] == 0 for r in lines)
    assert "graph break" not in capsys.readouterr().out


def test_compiled_training_says_a_graph_break_once(tmp_path, text_file, monkeypatch, capsys):
    """A graph break inside the compiled step (forced here) is reported on the console once,
    with its reason, and counted in the metrics."""
    _eager_compile(monkeypatch)
    original = Trainer.compute_loss

    def breaking(self, out, y):
        torch._dynamo.graph_break()
        return original(self, out, y)

    monkeypatch.setattr(Trainer, "compute_loss", breaking)
    result = _run(tmp_path / "r", text_file, steps=3, eval_every=3, log_every=1, compile=True)
    out = capsys.readouterr().out
    assert out.count("torch.compile graph break") == 1, out
    assert result["compile"]["graph_breaks"] >= 1  # counted when traced (training and evaluation)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["graph_breaks"] >= 1 and lines[-1]["graph_breaks"] == result["compile"]["graph_breaks"]


def test_ddp_settings_reach_wrap_model(tmp_path, text_file, monkeypatch):
    """train.ddp_bucket_mb, train.ddp_bucket_view and train.ddp_reduce_dtype are handed to the DDP
    wrapper (defaults 250, true and float32), and the FSDP2 all-gather dtype follows train.dtype (none in fp32, bf16 under
    bf16 autocast); the 2-process tests in test_distributed check what DDP and FSDP do with them."""
    import physlm_graph.runtime.model_setup as train_mod

    seen = []
    real = train_mod.wrap_model

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "wrap_model", spy)
    _run(tmp_path / "a", text_file, steps=1, eval_every=1)
    _run(tmp_path / "b", text_file, steps=1, eval_every=1, ddp_bucket_mb=64.0, ddp_bucket_view=False, dtype="bfloat16",
         ddp_reduce_dtype="bfloat16")
    assert seen == [{"bucket_mb": 250.0, "bucket_view": True, "param_dtype": None, "reduce_dtype": "float32"},
                    {"bucket_mb": 64.0, "bucket_view": False, "param_dtype": torch.bfloat16, "reduce_dtype": "bfloat16"}]


@pytest.mark.parametrize("tie, multiple", [(True, 1), (False, 1), (True, 64)])
def test_fused_loss_trains_the_same_weights(tmp_path, text_file, capsys, tie, multiple):
    """train.fused_loss: true (the head + loss as one operation; on CPU its torch form) gives the
    same losses and weights as false, with a tied and an untied head, and with a padded
    vocabulary (the fused loss then leaves the padded ids out); the run table says which."""
    ov = {} if tie else {"nodes.head.tie": None}
    states, logs = {}, {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        train(BLUEPRINT, data=str(text_file), overrides={**TINY, **ov, "params.dropout": 0.0}, out_dir=out,
              device="cpu", **{**FAST, "steps": 6, "eval_every": 6, "log_every": 1, "fused_loss": mode == "on",
                               "vocab_multiple": multiple})
        states[mode] = load_file(str(out / "last" / "model.safetensors"))
        logs[mode] = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        text = capsys.readouterr().out
        assert ("fused head + cross-entropy" in text) == (mode == "on"), text
    assert logs["on"] == pytest.approx(logs["off"], rel=1e-5)
    assert states["on"].keys() == states["off"].keys()
    for k, v in states["off"].items():
        torch.testing.assert_close(states["on"][k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_vocab_multiple_pads_the_table_and_masks_the_padded_ids(tmp_path, text_file, capsys):
    """train.vocab_multiple: the table grows to a multiple of 64, head.lm's logit_limit gives the
    padded ids -inf logits, so evaluation and generation never see them; resume works."""
    _run(tmp_path / "r", text_file, steps=10, eval_every=10, vocab_multiple=64, stop_after=5)
    result = _run(tmp_path / "r", text_file, steps=10, eval_every=10, vocab_multiple=64, resume=True)
    assert result["steps"] == 10 and math.isfinite(result["best_val_loss"])
    assert "padded to a multiple of 64" in " ".join(capsys.readouterr().out.split())
    ck = load_checkpoint(tmp_path / "r")
    real = ck.tokenizer.vocab_size
    assert real % 64 and ck.config["vocab_size"] == -(-real // 64) * 64
    assert yaml.safe_load((ck.path / "blueprint.yaml").read_text())["nodes"]["head"]["logit_limit"] == real
    logits = ck.module(torch.randint(0, real, (2, 16)))["logits"]
    assert torch.isinf(logits[..., real:]).all() and torch.isfinite(logits[..., :real]).all()
    ids = generate(ck.model, [1, 2, 3], max_new_tokens=300, temperature=5.0, seed=0)
    assert max(ids) < real


def test_vocab_multiple_needs_logits_straight_from_head_lm(tmp_path, text_file, capsys):
    doc = copy.deepcopy(yaml.safe_load(BLUEPRINT.read_text()))
    doc["nodes"]["capped"] = {"use": "scale", "in": "head", "factor": 0.5}
    doc["outputs"]["logits"] = "capped"
    train(doc, data=str(text_file), overrides=TINY, out_dir=tmp_path / "r", device="cpu",
          **{**FAST, "steps": 2, "vocab_multiple": 64})
    out = " ".join(capsys.readouterr().out.split())
    assert "train.vocab_multiple 64 not applied" in out, out
    ck = load_checkpoint(tmp_path / "r")
    assert ck.config["vocab_size"] == ck.tokenizer.vocab_size


def test_fused_loss_on_says_why_it_cannot(tmp_path, text_file):
    with pytest.raises(TrainingError, match="fused_loss is true but head.lm has a bias"):
        train(BLUEPRINT, data=str(text_file), overrides={**TINY, "nodes.head.bias": True}, out_dir=tmp_path / "r",
              device="cpu", **{**FAST, "steps": 1, "fused_loss": True})


def test_compile_mode_reaches_torch_compile(tmp_path, text_file, monkeypatch):
    """train.compile's mode is handed to torch.compile (model and model+loss), and with
    reduce-overhead every micro-step starts a new CUDA-graph step; the default passes no mode;
    a mode in the blueprint's train: section alone compiles."""
    real = torch.compile
    for mode, expect in (("reduce-overhead", "reduce-overhead"), ("default", None), ("blueprint", "max-autotune")):
        seen, marks = [], []

        def spy(fn, **kw):
            seen.append(kw.get("mode"))
            return real(fn, backend="eager")

        monkeypatch.setattr(torch, "compile", spy)
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
        torch._dynamo.reset()
        if mode == "blueprint":
            train(BLUEPRINT, data=str(text_file), overrides={**TINY, "train.compile": "max-autotune"},
                  out_dir=tmp_path / mode, device="cpu", **{**FAST, "steps": 3, "eval_every": 3, "accumulate": 2})
        else:
            _run(tmp_path / mode, text_file, steps=3, eval_every=3, log_every=1, compile=mode, accumulate=2)
        assert seen == [expect, expect]
        assert len(marks) == (3 * 2 if mode == "reduce-overhead" else 0)
    torch._dynamo.reset()


def test_compile_flag_takes_the_mode(monkeypatch):
    """`train --compile M` hands the mode to train(); `--compile` alone is the default mode."""
    import physlm_graph.runtime.train as train_mod

    seen = {}

    def fake_train(*a, **kw):
        seen.update(kw)
        return {"best_val_loss": None, "steps": 0, "tokens_seen": 0, "wall_s": 0.0, "last": "x", "best": None}

    monkeypatch.setattr(train_mod, "train", fake_train)
    assert main(["train", str(BLUEPRINT), "--data", "x.txt", "--compile", "reduce-overhead", "--no-progress"]) == 0
    assert seen["compile"] == "reduce-overhead"
    assert main(["train", str(BLUEPRINT), "--data", "x.txt", "--compile", "--no-progress"]) == 0
    assert seen["compile"] == "default"
    assert main(["train", str(BLUEPRINT), "--data", "x.txt", "--no-progress"]) == 0
    assert seen["compile"] is None  # the blueprint's train.compile decides


def test_the_old_compile_mode_spelling_is_refused_with_the_new_one(tmp_path, text_file):
    with pytest.raises(TrainingError, match="compile_mode is now the value of compile") as err:
        _run(tmp_path / "r", text_file, steps=1, compile_mode="reduce-overhead")
    assert "compile='reduce-overhead'" in str(err.value)


def test_compile_monitor_reports_the_eager_fallback(monkeypatch):
    """Past the recompile limit dynamo silently runs the code eagerly; the monitor says so once."""
    from physlm_graph.runtime._progress import CompileMonitor

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    mon = CompileMonitor()
    f = torch.compile(lambda x, n: x * n, backend="eager", dynamic=False)
    for n in range(4):
        f(torch.ones(2), n)
    lines = mon.check()
    assert any("recompile limit hit: this code now runs eagerly" in ln for ln in lines), lines
    assert mon.counts()["recompile_limit_hits"] >= 1 and mon.check() == []  # said once
    torch._dynamo.reset()


def test_metrics_carry_no_peak_memory_off_cuda(text_file, tmp_path):
    summary = train(BLUEPRINT, data=str(text_file), out_dir=tmp_path / "cpu", steps=2, device="cpu",
                    overrides=TINY, **{**FAST, "log_every": 1})
    rows = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("peak_memory_bytes" not in r for r in rows) and "peak_memory_bytes" not in summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_log_the_peak_cuda_memory(text_file, tmp_path):
    """Every logged step and the summary carry the main rank's ``max_memory_allocated``."""
    torch.cuda.reset_peak_memory_stats()
    summary = train(BLUEPRINT, data=str(text_file), out_dir=tmp_path / "gpu", steps=2, device="cuda",
                    overrides=TINY, **{**FAST, "log_every": 1})
    rows = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    weights = sum(p.numel() * 4 for p in load_checkpoint(summary["last"]).model.module.parameters())
    assert all(r["peak_memory_bytes"] >= 3 * weights for r in rows)  # weights, gradients, Adam's moments at least
    assert rows[-1]["peak_memory_bytes"] <= summary["peak_memory_bytes"] <= torch.cuda.max_memory_allocated()
