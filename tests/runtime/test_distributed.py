"""Several processes through torchrun (gloo on CPU here; NCCL on GPUs): data-parallel training
writes one checkpoint that loads in a single process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from physlm_graph.runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).parents[2]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_two_process_ddp_on_cpu_writes_one_loadable_checkpoint(tmp_path):
    """Two gloo ranks with gradient accumulation (no all-reduce on the first micro-batch)."""
    text = tmp_path / "t.txt"
    text.write_text(DATA.read_text()[:20000])
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(ROOT / "blueprints/baby-gpt-cpu.yaml"),
           "--data", str(text), "--steps", "6", "--out", str(out), "--device", "cpu", "--no-progress", "--gpus", "2",
           "--set", "layers=1", "--set", "dim=32", "--set", "heads=2", "--set", "train.eval_every=3",
           "--set", "train.eval_iters=2", "--set", "train.accumulate=2", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (ddp)" in proc.stdout
    assert proc.stdout.count("done:") == 1  # only rank 0 reports
    ck = load_checkpoint(out / "last")
    assert ck.trainer_state["step"] == 6
    assert ck.trainer_state["tokens_seen"] == 6 * 4 * 64 * 2 * 2  # both ranks' windows, 2 micro-batches each
    logits = ck.model.module(torch.randint(0, ck.tokenizer.vocab_size, (1, 8)))["logits"]
    assert torch.isfinite(logits).all()


_COUNT_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
from physlm_graph.runtime.distributed import DistInfo, grad_sync, wrap_model

strategy, bucket_mb = sys.argv[1], float(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
ref = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
net.load_state_dict(ref.state_dict())
calls = []
info = DistInfo(rank=rank, world=world)
if strategy == "ddp":
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    def counting(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    view = bucket_mb >= 1.0  # the tiny-bucket case runs without bucket views
    model = wrap_model(net, info, "ddp", [], bucket_mb=bucket_mb, bucket_view=view)
    assert isinstance(model, DDP) and model.gradient_as_bucket_view is view
    model.register_comm_hook(None, counting)
else:
    from torch.distributed.fsdp import fully_shard

    fully_shard(net[0])
    model = fully_shard(net)
g = torch.Generator().manual_seed(1)
xs = [torch.randn(world, 4, 8, generator=g) for _ in range(3)]  # 3 micro-batches, one slice per rank
# one plain step first: DDP uses a single bucket in its first iteration and sizes its buckets
# by bucket_cap_mb from the second on
model(torch.randn(4, 8, generator=g)).sum().backward()
net.zero_grad(set_to_none=True)
calls.clear()
for i, x in enumerate(xs):
    with grad_sync(model, info, strategy, last=i == len(xs) - 1):
        (model(x[rank]).square().mean() / len(xs)).backward()
# the reference: one process, every rank's micro-batches, averaged the same way
for x in xs:
    for r in range(world):
        (ref(x[r]).square().mean() / (len(xs) * world)).backward()
for p, q in zip(net.parameters(), ref.parameters()):
    got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    torch.testing.assert_close(got, q.grad, atol=1e-6, rtol=1e-5)
print(f"rank {rank} allreduce calls {len(calls)}", flush=True)
dist.barrier()
dist.destroy_process_group()
# leave without running destructors: at interpreter exit gloo's threads sometimes abort the
# process ("terminate called without an active exception") after all the work above succeeded
os._exit(0)
"""


@pytest.mark.parametrize("strategy, bucket_mb, calls", [("ddp", 25.0, 1), ("ddp", 1e-6, 4), ("fsdp", 25.0, 0)])
def test_accumulation_communicates_only_on_the_last_micro_batch(tmp_path, strategy, bucket_mb, calls):
    """Two gloo processes, three micro-batches: the gradients equal those of all ranks'
    micro-batches averaged in one process, and DDP all-reduces once (not three times): one
    bucket for the whole net by default, one per parameter tensor (4) when ``bucket_mb`` is
    tinier than any of them (that case also without bucket views, ``ddp_bucket_view``)."""
    script = tmp_path / "count.py"
    script.write_text(_COUNT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), strategy, str(bucket_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"allreduce calls {calls}") == 2, proc.stdout


def _train_on_two_ranks(tmp_path: Path, name: str, *args: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``physlm-graph train`` of a tiny baby-gpt-cpu on two gloo ranks (4 steps, batch 4 per rank,
    width 32, on 20,000 characters of Shakespeare) with ``args`` added; returns the run's stdout
    and the written weights."""
    text = tmp_path / "t.txt"
    if not text.exists():
        text.write_text(DATA.read_text()[:20000])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}  # no wrapped table rows
    out = tmp_path / name
    cmd = [sys.executable, "-m", "physlm_graph", "train", str(ROOT / "blueprints/baby-gpt-cpu.yaml"),
           "--data", str(text), "--steps", "4", "--out", str(out), "--device", "cpu", "--no-progress",
           "--gpus", "2", "--set", "dim=32", "--set", "heads=2", "--set", "train.eval_every=4",
           "--set", "train.eval_iters=1", "--batch-size", "4", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, load_checkpoint(out / "last").model.module.state_dict()


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 5e-4)])
def test_fsdp_training_matches_ddp(tmp_path, dtype, tol):
    """``--strategy fsdp`` through the real trainer: the blueprint's GraphModule calls the
    components inside each block, so each block is sharded as the group of those components
    (hooks on the block container would never fire). Two gloo ranks, 4 steps with
    accumulation; the weights written equal those of the same run under DDP. Under bf16 the
    shards are all-gathered in bf16 (said in the run summary) and the written weights stay
    fp32, within bf16 rounding of DDP's."""
    states = {}
    for strategy in ("ddp", "fsdp"):
        stdout, states[strategy] = _train_on_two_ranks(
            tmp_path, strategy, "--strategy", strategy, "--set", "layers=2", "--set", "train.accumulate=2",
            "--set", f"train.dtype={dtype}")
        label = f"fsdp, {dtype} all-gathers" if strategy == "fsdp" else strategy
        assert f"2 processes ({label})" in stdout, stdout
    assert states["ddp"].keys() == states["fsdp"].keys()
    for k, v in states["ddp"].items():
        assert states["fsdp"][k].dtype == torch.float32, k
        torch.testing.assert_close(states["fsdp"][k], v, atol=tol, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_sequential_order_gives_each_rank_its_slice(tmp_path):
    """``train.data_order: sequential`` on two gloo ranks of batch 4: rank r reads rows 4r..4r+3 of
    the slice one process of batch 8 reads, so the averaged gradients, and the weights written after
    4 steps, equal that process's (each rank its own slice: no token read twice, none skipped)."""
    from physlm_graph.runtime.train import train

    stdout, ddp = _train_on_two_ranks(tmp_path, "ddp", "--set", "layers=1", "--set", "train.data_order=sequential")
    assert "2 processes (ddp)" in stdout
    train(ROOT / "blueprints/baby-gpt-cpu.yaml", data=str(tmp_path / "t.txt"), out_dir=tmp_path / "one", steps=4,
          device="cpu", progress=False, batch_size=8, eval_every=4, eval_iters=1, data_order="sequential",
          overrides={"dim": 32, "heads": 2, "layers": 1})
    one = load_checkpoint(tmp_path / "one" / "last").model.module.state_dict()
    assert ddp.keys() == one.keys()
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, atol=1e-5, rtol=1e-4, msg=k)
    state = load_checkpoint(tmp_path / "ddp" / "last").trainer_state["batcher"]
    assert state["pos"] == 4 * 2 * 4 * 64 and state["world"] == 2


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_ddp_with_the_fused_loss_matches_ddp_without(tmp_path):
    """``train.fused_loss: true`` under DDP: the loss runs inside the wrapped module's forward, so
    an untied head's gradient is all-reduced like every other; two gloo ranks with accumulation
    write the same weights as the unfused run."""
    states = {}
    for mode in ("off", "on"):
        stdout, states[mode] = _train_on_two_ranks(
            tmp_path, mode, "--set", "layers=1", "--set", "nodes.head.tie=null", "--set", "train.accumulate=2",
            "--set", f"train.fused_loss={'true' if mode == 'on' else 'false'}")
        assert ("fused head + cross-entropy" in stdout) == (mode == "on"), stdout
    assert "head.weight" in states["on"] and not torch.equal(states["on"]["head.weight"], states["on"]["tok.weight"])
    for k, v in states["off"].items():
        torch.testing.assert_close(states["on"][k], v, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_bf16_gradient_all_reduce_trains_close_to_fp32(tmp_path):
    """``train.ddp_reduce_dtype: bfloat16`` registers the bf16 all-reduce hook: two gloo ranks
    write weights that differ from the fp32 all-reduce's (the hook ran) by bf16 rounding only, and
    the run summary says so."""
    states = {}
    for dtype in ("float32", "bfloat16"):
        stdout, states[dtype] = _train_on_two_ranks(
            tmp_path, dtype, "--set", "layers=1", "--set", f"train.ddp_reduce_dtype={dtype}")
        assert ("2 processes (ddp, bf16 gradient all-reduce)" in stdout) == (dtype == "bfloat16"), stdout
    worst = max(float((states["bfloat16"][k] - v).abs().max()) for k, v in states["float32"].items())
    print("worst weight difference", worst)
    assert 0.0 < worst < 1e-3
    for k, v in states["float32"].items():
        assert states["bfloat16"][k].dtype == torch.float32, k


def test_bf16_gradient_all_reduce_is_refused_under_fsdp(tmp_path):
    """FSDP2 reduce-scatters in fp32: asking it for DDP's bf16 all-reduce is an error, not ignored."""
    from physlm_graph.runtime.train import Trainer, TrainingError

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 500)
    trainer = Trainer(ROOT / "blueprints/baby-gpt-cpu.yaml", data=str(text), out_dir=tmp_path / "o", device="cpu",
                      strategy="fsdp", ddp_reduce_dtype="bfloat16")
    with pytest.raises(TrainingError, match="ddp_reduce_dtype: bfloat16 is for DDP"):
        trainer.setup()


_HOOK_SCRIPT = r"""
import os, torch, torch.distributed as dist
from torch import nn
from physlm_graph.runtime.distributed import DistInfo, wrap_model
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
info = DistInfo(rank=rank, world=2, local_rank=rank)
ddp = wrap_model(net, info, "ddp", [], bucket_mb=1e-6, reduce_dtype="bfloat16")  # one bucket per tensor
torch.manual_seed(1 + rank)
x = torch.randn(16, 64) * (1 + 9 * rank)  # ranks with gradients of different sizes
own = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
own.load_state_dict(net.state_dict())
own(x).pow(2).mean().backward()
ddp(x).pow(2).mean().backward()
worst, exact = 0.0, True
for p, q in zip(net.parameters(), own.parameters()):
    mine = q.grad.clone()
    dist.all_reduce(mine)  # fp32 sum of both ranks' own gradients
    mean = mine / 2
    worst = max(worst, float((p.grad - mean).abs().max() / mean.abs().max()))
    exact = exact and torch.equal(p.grad, mean)
print(f"rank {rank} worst {worst:.3e} exact {exact}", flush=True)
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_bf16_all_reduce_hook_gives_the_mean_to_bf16_rounding(tmp_path):
    """The hook's result is the mean of the ranks' gradients (not their sum), within bf16 rounding
    of the fp32 mean, and not equal to it (the bf16 path ran)."""
    script = tmp_path / "hook.py"
    script.write_text(_HOOK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = re.findall(r"rank (\d) worst (\S+) exact (True|False)", proc.stdout)  # ranks' lines may interleave
    assert sorted(r for r, _, _ in found) == ["0", "1"], proc.stdout
    for _, worst, exact in found:
        assert float(worst) < 2 ** -7 and exact == "False", proc.stdout
