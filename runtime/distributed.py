"""Training on several GPUs and machines through torchrun: DDP, or FSDP2 for large models.

    torchrun --nproc-per-node 2 -m physlm_graph train BLUEPRINT --data PATH ...
    physlm-graph train BLUEPRINT --data PATH --gpus 2          # launches the line above
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m physlm_graph train BLUEPRINT --data PATH            # several machines

Each rank draws its own random windows (seed + rank), so the data are sharded by sampling;
gradients are averaged by DDP (or reduce-scattered by FSDP2); only rank 0 prints and logs. A
full checkpoint (rank 0 writes it, gathered first under FSDP2) and a sharded one (every rank
writes its own pieces, ``runtime/sharded_checkpoint.py``) both load on any number of GPUs, or on
a CPU.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DistInfo", "init_distributed", "wrap_model", "grad_sync", "full_state_dict", "launch_torchrun", "barrier",
           "all_mean"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local)


def close_distributed() -> None:
    """Leave the process group, if one was joined: every rank waits for the others, then the
    group is destroyed, so no backend thread is still running when the interpreter exits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, block_paths: list[str], *,
               bucket_mb: float = 250.0, bucket_view: bool = True,
               param_dtype: torch.dtype | None = None, reduce_dtype: str = "float32") -> nn.Module:
    """DDP (the default) or FSDP2 (``fully_shard`` on every block instance, then the root).

    DDP all-reduces gradients in buckets of ``bucket_mb`` MiB while the backward still runs;
    with ``bucket_view`` the parameters' ``.grad`` are views into those buckets, which saves
    a copy of every gradient per step and its memory. FSDP2 with ``param_dtype`` (bf16 when
    training under bf16 autocast) all-gathers the weights in that dtype and reduce-scatters
    the gradients in fp32; the sharded master weights and the optimizer stay fp32. DDP with
    ``reduce_dtype="bfloat16"`` all-reduces each bucket in bf16 (``bf16_all_reduce``):
    half the bytes on the wire, the sum rounded to bf16 once; FSDP2 ignores it (its reduce-scatter
    stays fp32)."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for group in shard_groups(model, block_paths):
            fully_shard(group, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = [info.local_rank] if torch.cuda.is_available() else None
    ddp = DDP(model, device_ids=dev, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=bucket_view)
    if reduce_dtype == "bfloat16":
        ddp.register_comm_hook(None, bf16_all_reduce)
    elif reduce_dtype != "float32":
        raise ValueError(f"wrap_model: reduce_dtype {reduce_dtype!r} is not float32 or bfloat16")
    return ddp


def bf16_all_reduce(group, bucket):  # noqa: ANN001, ANN201 - DDP checks annotations against real types
    """DDP communication hook (a process group or None, a GradBucket -> a Future of the bucket):
    the bucket's mean over ranks, sent in bf16. The bucket is cast to
    bf16 and divided by the world size before the sum (so the sum cannot overflow where the fp32
    one would not), all-reduced, and written back into the fp32 bucket. torch's own
    ``bf16_compress_hook`` does the same but refuses any backend but NCCL/XCCL; this one also
    runs on gloo (CPU tests)."""
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    buf = bucket.buffer()
    sent = buf.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(sent, group=group, async_op=True).get_future()

    def unpack(f: Any) -> torch.Tensor:
        buf.copy_(f.value()[0])
        return buf

    return fut.then(unpack)


def shard_groups(model: nn.Module, block_paths: list[str]) -> list[list[nn.Module]]:
    """One FSDP2 group per block instance: the modules inside it that the graph calls.

    A compiled blueprint's GraphModule calls the components inside a block (``trunk.0.attn``),
    never the block container (``trunk.0``) itself, so hooks on the container would never fire
    and its weights would stay sharded. ``fully_shard`` on the list of called modules gathers the
    block's weights before the first of them runs and frees them after the last. Weights used
    outside any block (embeddings, a tied head) stay with the root."""
    from torch import fx

    from physlm_graph._passes import called_modules

    called: list[str] = []
    for name, gm in model.named_modules():
        if isinstance(gm, fx.GraphModule):  # checkpointed blocks' calls included (train.checkpointing)
            called += [f"{name}.{t}" if name else t for t in called_modules(gm)]
    groups = []
    for path in block_paths:
        inside = [t for t in dict.fromkeys(called) if t == path or t.startswith(path + ".")]
        inside = [t for t in inside if not any(t.startswith(o + ".") for o in inside)]  # outermost only
        mods = [model.get_submodule(t) for t in inside]
        mods = [m for m in mods if any(True for _ in m.parameters())]
        if mods:
            groups.append(mods)
    return groups


def grad_sync(model: nn.Module, info: DistInfo, strategy: str, *, last: bool) -> contextlib.AbstractContextManager:
    """Gradient synchronisation for one micro-batch of an accumulated step: only the last one
    communicates. DDP skips its all-reduce inside ``no_sync`` (gradients accumulate locally and
    the last backward reduces their sum); FSDP2 is told through ``set_requires_gradient_sync``.
    The forward and the backward of the micro-batch both run inside the returned context."""
    if not info.enabled:
        return contextlib.nullcontext()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()  # type: ignore[operator]


def full_state_dict(model: nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """The unsharded weights (on every rank for DDP; gathered to CPU for FSDP2)."""
    if strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world


def check_launch(gpus: int, device: str = "auto") -> None:
    """Refuse ``--gpus N`` that this machine cannot run: N CUDA processes need N GPUs. With
    ``--device cpu`` the N processes are CPU processes over gloo (for testing)."""
    from physlm_graph._errors import PhysLMError

    if gpus < 1:
        raise PhysLMError(f"--gpus must be a positive integer, got {gpus}")
    if device == "cpu":
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise PhysLMError(f"--gpus {gpus}: this machine has no CUDA GPU",
                          fix="drop --gpus, or add --device cpu to run that many CPU processes over gloo (for testing)")
    if gpus > n:
        raise PhysLMError(f"--gpus {gpus}: this machine has {n} CUDA GPU(s)", fix=f"use --gpus {n} or fewer")


def launch_torchrun(gpus: int, argv: list[str], *, device: str = "auto") -> int:
    """Re-run this command under torchrun with ``gpus`` processes on this machine (see ``check_launch``)."""
    check_launch(gpus, device)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "physlm_graph", *argv]
    return subprocess.call(cmd)
