"""An independent, hand-written model of the modded-nanogpt optimization-track baseline (track 3),
the function ``blueprints/speedrun-track3.yaml`` describes, for tests and benchmarks to compare
against. Plain PyTorch; its layout follows the program (separate q, k, v projections, the head
named ``proj``), so ``load_blueprint_state`` maps the blueprint's state dict onto it.

Dtypes: the embedding table is bf16 (``embed_dtype``); the lookup goes to the autocast dtype under
autocast, else to float32, so without autocast everything computes in float32 and under bf16
autocast the residual stream is bf16, as in the program. The logits are soft-capped in float32.

The program's training recipe is written out here too, apart from ``runtime/recipe.py`` and
``runtime/muon.py``: ``hand_init`` (its init by name), ``HandMuon`` (its Muon, one matrix at a time,
the update optionally compiled as the program compiles it), ``hand_optimizers`` (Muon on the blocks'
matrices, AdamW on the rest) and ``hand_step`` (summed losses over the micro-batches, the
stable-then-decay schedule, every optimizer stepped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32


class HandRMSNorm(nn.Module):
    """``F.rms_norm`` with a learned gain; eps is torch's default, the input dtype's machine epsilon."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight=self.gain.to(x.dtype))


class HandRotary(nn.Module):
    """Half-truncated rotary positions on the pairs (i, i + d/2), turned by the negative angle."""

    def __init__(self, head_dim: int, base: float = 1024.0) -> None:
        super().__init__()
        q = head_dim // 4
        turning = base ** (-torch.arange(q, dtype=torch.float64) / (q - 1))  # (d/4,)
        self.register_buffer("freq", torch.cat([turning, torch.zeros(head_dim // 2 - q, dtype=torch.float64)]).float(),
                             persistent=False)  # (d/2,)

    def forward(self, x: Tensor) -> Tensor:  # x (B, T, H, d)
        t = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)
        angle = (t[:, None] * self.freq[None, :])[None, :, None, :]  # (1, T, 1, d/2)
        c, s = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * c + b * s, b * c - a * s], dim=-1)


class HandAttention(nn.Module):
    def __init__(self, d: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.h, self.hd, self.scale = d // head_dim, head_dim, scale
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.proj = nn.Linear(d, d)
        self.rotary = HandRotary(head_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (lin(x).view(B, T, self.h, self.hd) for lin in (self.q, self.k, self.v))  # (B, T, H, hd)
        q, k = F.rms_norm(q, (self.hd,)), F.rms_norm(k, (self.hd,))
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class HandBlock(nn.Module):
    def __init__(self, d: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = HandRMSNorm(d), HandRMSNorm(d)
        self.attn = HandAttention(d, head_dim, scale)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.proj(F.relu(self.fc(self.norm2(x))).square())


class HandSpeedrun(nn.Module):
    """The track-3 baseline: bf16 embedding, RMSNorm, ``layers`` blocks, RMSNorm, a biased head,
    logits ``cap x / sqrt(x^2 + cap^2)``. ``forward`` returns the capped float32 logits (B, T, V);
    ``loss`` the cross-entropy summed over tokens, as the program's."""

    def __init__(self, vocab: int = 50304, dim: int = 768, layers: int = 12, head_dim: int = 128, *,
                 scale: float = 0.12, cap: float = 15.0, embed_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.cap = cap
        self.embed = nn.Embedding(vocab, dim).to(embed_dtype)
        self.norm0 = HandRMSNorm(dim)
        self.blocks = nn.ModuleList(HandBlock(dim, head_dim, scale) for _ in range(layers))
        self.norm_f = HandRMSNorm(dim)
        self.proj = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        x = self.norm0(x.to(_compute_dtype(x.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.proj(self.norm_f(x)).float()  # (B, T, V)
        return self.cap * logits * torch.rsqrt(logits.square() + self.cap**2)

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def blueprint_to_hand(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The blueprint's state dict (``tok.weight``, ``trunk.3.attn.qkv.weight``, ...) renamed and split
    into ``HandSpeedrun``'s (``embed.weight``, ``blocks.3.attn.q.weight``, ...)."""
    out: dict[str, Tensor] = {}
    fixed = {"tok.weight": "embed.weight", "x0.weight": "norm0.gain", "norm.weight": "norm_f.gain",
             "head.weight": "proj.weight", "head.bias": "proj.bias"}
    block = {"n1.weight": "norm1.gain", "n2.weight": "norm2.gain", "attn.proj.weight": "attn.proj.weight",
             "attn.proj.bias": "attn.proj.bias", "mlp.fc.weight": "fc.weight", "mlp.fc.bias": "fc.bias",
             "mlp.proj.weight": "proj.weight", "mlp.proj.bias": "proj.bias"}
    for name, t in state.items():
        if name in fixed:
            out[fixed[name]] = t
            continue
        trunk, i, rest = name.split(".", 2)
        if trunk != "trunk":
            raise KeyError(f"unexpected blueprint parameter {name!r}")
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for part, piece in zip("qkv", t.chunk(3, dim=0)):  # [q | k | v] rows
                out[f"blocks.{i}.attn.{part}.{kind}"] = piece
        else:
            out[f"blocks.{i}.{block[rest]}"] = t
    return out


def load_blueprint_state(hand: HandSpeedrun, state: dict[str, Tensor]) -> None:
    """Copy a blueprint model's weights into ``hand`` (strict: every parameter on both sides)."""
    hand.load_state_dict(blueprint_to_hand(state), strict=True)


# ---------------------------------------------------------------- the program's training recipe


@torch.no_grad()
def hand_init(model: HandSpeedrun, seed: int = 0) -> None:
    """The program's init, by parameter name: weights of anything named ``proj`` (the blocks' output
    projections and the head) zero, the table N(0, 1), other weights N(0, 0.33 / fan_in), biases
    zero, gains one."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif name.endswith("gain"):
            p.fill_(1.0)
        elif "proj" in name:
            p.zero_()
        else:
            std = 1.0 if name.startswith("embed") else math.sqrt(0.33 / p.shape[-1])
            p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


def _orthogonal(g: Tensor) -> Tensor:
    """The program's Newton-Schulz: bf16, 12 steps of X <- 2 X + (-1.5 A + 0.5 A A) X, A = X X^T."""
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(12):
        a = x @ x.mT
        x = 2.0 * x + (-1.5 * a + 0.5 * a @ a) @ x
    return x.mT if g.size(0) > g.size(1) else x


def _muon_update(grad: Tensor, buf: Tensor, mu: float) -> Tensor:
    buf.lerp_(grad, 1 - mu)
    update = _orthogonal(grad.lerp(buf, mu))  # Nesterov
    return update * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


class HandMuon(torch.optim.Optimizer):
    """The program's Muon on one device: momentum 0.95 with Nesterov, the orthogonalised update,
    decoupled weight decay ``W <- (1 - lr wd) W - lr U``. ``compiled``: the update through
    ``torch.compile``, as the program does."""

    def __init__(self, params: list[nn.Parameter], *, lr: float, weight_decay: float, compiled: bool = False) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, mu=0.95))
        self.update: Callable[..., Tensor] = torch.compile(_muon_update) if compiled else _muon_update

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                update = self.update(p.grad, state["momentum"], group["mu"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def hand_optimizers(model: HandSpeedrun, *, compiled: bool = False) -> list[torch.optim.Optimizer]:
    """The recipe of issue 26: Muon (lr 0.025, wd 0.05) on the blocks' matrices; AdamW (betas 0.8,
    0.95, eps 1e-10, wd 0.001) on the table (lr 0.7), the head (lr 0.004) and every vector (lr 0.015).
    Each group remembers its ``initial_lr``."""
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    on_cuda = model.proj.weight.is_cuda
    adamw = torch.optim.AdamW([dict(params=[model.embed.weight], lr=0.7), dict(params=[model.proj.weight], lr=0.004),
                               dict(params=vectors, lr=0.015)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.001,
                              **({"fused": True} if on_cuda else {}))
    opts = [adamw, HandMuon(matrices, lr=0.025, weight_decay=0.05, compiled=compiled)]
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def hand_step(model: HandSpeedrun, opts: list[torch.optim.Optimizer], batches: Iterator[tuple[Tensor, Tensor]], *,
              step: int, steps: int, accumulate: int, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
              cooldown: float = 0.7) -> Tensor:
    """One step of the program: ``accumulate`` micro-batches, each back-propagating its summed
    cross-entropy; the lr ``initial_lr x 1`` for the first 30% of the steps, then
    ``initial_lr x (1 - step / steps) / 0.7``; every optimizer steps, then the gradients go.
    Returns the step's summed loss (detached, on the device)."""
    loss_fn = loss_fn or model.loss
    total = torch.zeros((), device=model.proj.weight.device)
    for _ in range(accumulate):
        x, y = next(batches)
        loss = loss_fn(x, y)
        loss.backward()
        total += loss.detach()
    progress = step / steps
    eta = 1.0 if progress < 1 - cooldown else (1 - progress) / cooldown
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * eta
        opt.step()
    model.zero_grad(set_to_none=True)
    return total
