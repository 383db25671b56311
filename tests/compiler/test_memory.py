"""``build --memory``: the activation count on meta equals what a real forward saves, the phase
model's peak equals the live bytes of a real CPU training step (fp32 and bf16 autocast,
checkpointing on and off), and the parts follow the parameter count, the optimizer and the
world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from physlm_graph import compile_blueprint
from physlm_graph._errors import PhysLMError
from physlm_graph._livebytes import LiveBytes, measure_step
from physlm_graph._memory import estimate_memory
from physlm_graph._passes import checkpoint_blocks
from physlm_graph.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_LLAMA = ["vocab=512", "dim=128", "heads=4", "kv_heads=2", "layers=2", "hidden=256", "context=128"]
# a vocabulary large next to the width: the loss's logits-sized tensors set the peak
BIG_VOCAB = ["vocab=4096", "dim=64", "heads=4", "kv_heads=2", "layers=2", "hidden=128", "context=64"]


def _real_saved_bytes(blueprint: Path, overrides: list[str], batch: int, seq: int) -> int:
    """What autograd keeps for backward in a real CPU forward + cross-entropy, fp32: each storage
    once, parameters excluded (the independent count the meta estimate must reproduce)."""
    cm = compile_blueprint(blueprint, overrides=overrides, device="cpu")
    model = cm.module.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, 64, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens=x)["logits"]
        flat = logits.reshape(-1, logits.size(-1)).float()
        F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long))
    return sum(kept.values())


@pytest.mark.parametrize("blueprint,overrides", [("baby-gpt-cpu.yaml", []), ("llama-style.yaml", SMALL_LLAMA)])
def test_meta_activation_count_equals_a_real_forward(blueprint, overrides):
    path = ROOT / "blueprints" / blueprint
    cm = compile_blueprint(path, overrides=overrides, device="meta")
    for batch in (1, 3):
        est = estimate_memory(cm, batch=batch, seq=32, dtype="float32")
        assert est.activations == _real_saved_bytes(path, overrides, batch, 32), (blueprint, batch)


def test_parts_follow_params_optimizer_dtype_and_world():
    cm = compile_blueprint(ROOT / "blueprints" / "llama-style.yaml", overrides=SMALL_LLAMA, device="meta")
    n = cm.num_params
    adam = estimate_memory(cm, batch=4, seq=64, dtype="bfloat16", world=4)
    assert adam.params == n and adam.weights == 4 * n and adam.gradients == 4 * n
    # autocast copies what matrix products read: not the embedding table (a lookup) nor the five norms
    assert adam.optimizer_state == 8 * n and adam.weight_casts == 2 * (n - 512 * 128 - 5 * 128)
    muon = estimate_memory(cm, batch=4, seq=64, dtype="bfloat16", optimizer="muon")
    assert muon.optimizer_state == 4 * n
    fp32 = estimate_memory(cm, batch=4, seq=64, dtype="float32")
    assert adam.activations < fp32.activations and fp32.weight_casts == 0
    # logits: 4 x 64 rows of 512 fp32 values
    assert adam.logits_grad == 4 * 64 * 512 * 4
    # DDP's buckets hold every gradient for the whole run: more than one device, which holds them
    # only from the backward on; without the bucket view they are one more copy
    assert adam.single < adam.ddp <= adam.static + adam.gradients + max(adam.forward, adam.backward)
    assert estimate_memory(cm, batch=4, seq=64, bucket_view=False).ddp == adam.single + adam.gradients
    assert adam.fsdp < adam.single  # state divided by 4, two gathered blocks added
    eight = estimate_memory(cm, batch=4, seq=64, dtype="bfloat16", world=8)
    # more devices: smaller shards of the static memory and the gradients; DDP replicates them all
    assert eight.fsdp < adam.fsdp and eight.ddp == adam.ddp and eight.single == adam.single
    assert adam.largest_block > 0
    double = estimate_memory(cm, batch=8, seq=64, dtype="bfloat16")
    assert double.activations - adam.activations == pytest.approx(4 * 64 * adam.activations_per_token)


def test_refuses_a_module_with_real_weights_and_an_unknown_optimizer():
    cm = compile_blueprint(ROOT / "blueprints" / "baby-gpt-cpu.yaml", device="cpu")
    with pytest.raises(PhysLMError, match="meta"):
        estimate_memory(cm, batch=1, seq=8)
    meta = compile_blueprint(ROOT / "blueprints" / "baby-gpt-cpu.yaml", device="meta")
    with pytest.raises(PhysLMError, match="unknown optimizer"):
        estimate_memory(meta, batch=1, seq=8, optimizer="lion")


def test_build_memory_json_and_table(capsys):
    bp = str(ROOT / "blueprints" / "baby-gpt-cpu.yaml")
    assert main(["build", bp, "--memory", "--json", "--batch", "2", "--seq", "16", "--world", "2"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["batch"] == 2 and mem["seq"] == 16 and mem["world"] == 2 and mem["single"] > mem["activations"] > 0
    assert mem["single"] == mem["static"] + mem[mem["peak_phase"]] and mem["peak_phase"] in ("forward", "backward", "step")
    assert main(["build", bp, "--memory", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "training memory per device" in out and "FSDP x8" in out and "peak (backward)" in out


def test_build_memory_options_are_checked(capsys):
    bp = str(ROOT / "blueprints" / "baby-gpt-cpu.yaml")
    for bad in (["--batch", "0"], ["--world", "-1"], ["--optimizer", "lion"]):
        with pytest.raises(SystemExit) as e:
            main(["build", bp, "--memory", *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_checkpointing_shrinks_the_estimate():
    cm = compile_blueprint(ROOT / "blueprints" / "llama-style.yaml", overrides=SMALL_LLAMA, device="meta")
    plain = estimate_memory(cm, batch=2, seq=64, dtype="float32")
    cm = compile_blueprint(ROOT / "blueprints" / "llama-style.yaml", overrides=SMALL_LLAMA, device="meta")
    blocks = estimate_memory(cm, batch=2, seq=64, dtype="float32", checkpointing="blocks")
    # two layers: what the blocks keep plus one block recomputed in its backward
    assert blocks.activations < 0.7 * plain.activations and blocks.checkpointing == "blocks"


def test_a_window_past_the_context_is_a_clear_error(capsys):
    bp = str(ROOT / "blueprints" / "baby-gpt-cpu.yaml")
    assert main(["build", bp, "--memory", "--seq", "5000"]) == 2
    err = capsys.readouterr().err
    assert "memory estimate could not run the model on meta" in err and "max_seq_len 64" in err
    assert "Traceback" not in err


def test_live_bytes_follows_storages_as_they_come_and_go():
    x = torch.randn(1000, 100, requires_grad=True)  # existed before: not counted
    with LiveBytes({LiveBytes.key(x)}) as live:
        y = x * 2  # 400,000 bytes
        z = y.sin()  # 400,000; sin's backward keeps y
        del y
        assert live.now == 800_000
        total = z[:10].sum()  # a view adds nothing; the sum 4 bytes
        live.phase = "backward"
        total.backward()
    assert live.peak("forward") == 800_004
    # at sin's backward: y, z, the slice's gradient (zeros the size of z), cos(y) and the product,
    # with the sum and its seed gradient
    assert live.peak("backward") == 5 * 400_000 + 4 + 4
    del z, total
    assert live.now == 400_000  # x.grad
    x.grad = None
    assert live.now == 0


def _measured(blueprint: str, overrides: list[str], batch: int, seq: int, dtype: str) -> dict:
    cm = compile_blueprint(ROOT / "blueprints" / blueprint, overrides=overrides, device="cpu")
    checkpoint_blocks(cm.module, cm.resolved, cm.train_config.checkpointing)
    torch.manual_seed(0)
    x, y = torch.randint(0, 64, (batch, seq)), torch.randint(0, 64, (batch, seq))
    return measure_step(cm.module, {"tokens": x}, y, dtype=dtype, steps=2)


@pytest.mark.parametrize("blueprint,overrides,dtype", [
    ("baby-gpt-cpu.yaml", [], "float32"),
    ("baby-gpt-cpu.yaml", ["train.checkpointing=blocks"], "bfloat16"),
    ("llama-style.yaml", BIG_VOCAB, "bfloat16"),
    ("llama-style.yaml", [*BIG_VOCAB, "train.checkpointing=blocks"], "float32"),
])
def test_the_phases_match_a_real_cpu_training_step(blueprint, overrides, dtype):
    """The estimate on meta (autocast and fused attention emulated) against the same step run for
    real on CPU (CPU autocast, CPU attention kernels, fused AdamW), each phase and the peak."""
    meta = compile_blueprint(ROOT / "blueprints" / blueprint, overrides=overrides, device="meta")
    est = estimate_memory(meta, batch=2, seq=32, dtype=dtype, checkpointing=meta.train_config.checkpointing)
    real = _measured(blueprint, overrides, 2, 32, dtype)
    assert est.peak_phase == real["peak_phase"] == "backward"
    for part in ("static", "forward", "backward", "step"):
        assert getattr(est, part) == pytest.approx(real[part], rel=0.01), part
    assert est.single == pytest.approx(real["peak"], rel=0.01)


def test_the_peak_is_the_largest_phase_not_a_sum():
    cm = compile_blueprint(ROOT / "blueprints" / "llama-style.yaml", overrides=BIG_VOCAB, device="meta")
    est = estimate_memory(cm, batch=2, seq=64, dtype="bfloat16")
    assert est.single == est.static + max(est.forward, est.backward, est.step)
    assert est.static == est.weights + est.buffers + est.optimizer_state
    assert est.step == est.gradients  # fused AdamW: every gradient, nothing else
    # the backward peaks as it starts: every saved activation, the weight copies and two fp32
    # logits-sized gradients (of the log-softmax output and of the logits); no parameter's gradient
    # yet (the inputs, which ``activations`` counts, are the caller's)
    assert est.backward == pytest.approx(est.activations + est.weight_casts + 2 * est.logits_grad, rel=1e-3)
    # gradients never coexist with all the activations: the peak is below the sum of the parts
    assert est.single < est.static + est.gradients + est.activations + est.weight_casts + est.logits_grad


def test_measure_step_refuses_what_it_would_ignore():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="float16"):
        measure_step(model, {"input": torch.zeros(2, 4)}, torch.zeros(2, dtype=torch.long), dtype="float16")
