"""Does moe.category balance its experts? fixed (Switch loss + z-loss) vs faithful (as published).

Trains a tiny character-level LM on tinyshakespeare for a few hundred steps, per mode and per
seed (3 by default; the seed sets the init and the training batches), with the same data and
architecture (pre-norm blocks: causal attention, then ``moe.category``), and prints per mode
and seed, then the mean over seeds:

- busiest/mean: the busiest expert's token count over the mean count, counted from the
  router's own top-1 choices (argmax of the router logits, no capacity, nothing dropped) on
  8 held-out batches at the end (1.0 = perfectly balanced; worst layer shown);
- router change: ||W_r(end) - W_r(init)||_F / ||W_r(init)||_F (worst layer);
- the final validation cross-entropy.

Targets: fixed busiest/mean <= 1.2 (mean over seeds); faithful router change exactly 0 (no
gradient reaches it). Losses: CE + 0.01 * balance + 1e-3 * z_loss (ANCHORS.md), each layer's
aux values added with that weight as in the Switch Transformer (``--layer-reduce mean`` averages
them over layers instead, as the Holographic seed's loss does, SEEDS.md §1.3). fixed uses the component's default Switch router jitter
(1e-2; ``--router-jitter 0`` turns it off). The model is plain torch around the component
(built through the registry), so this runs without the blueprint compiler. CPU, about 15-30 s
per run at the default sizes (3 seeds x 2 modes: a few minutes on an idle 2-core machine)::

    python benchmarks/moe_balance.py [--steps 300] [--seeds 3] [--data PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from physlm_graph import REGISTRY, TensorSpec  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, moe: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.moe = moe

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = h + self.attn(self.ln1(h))
        y, balance, z_loss = self.moe(self.ln2(h))
        return h + y, balance, z_loss


class CharLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int, moe_params: dict,
                 layer_reduce: str = "sum") -> None:
        super().__init__()
        self.layer_reduce = layer_reduce
        info = REGISTRY.get("moe.category")
        params = info.params.model_validate(moe_params)
        spec = {"x": TensorSpec(shape=(1, seq, dim))}
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, info.builder(params, spec)) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        balance = z_loss = h.new_zeros(())
        for block in self.blocks:
            h, b, z = block(h)
            balance, z_loss = balance + b, z_loss + z
        n = len(self.blocks)
        if self.layer_reduce == "mean":
            balance, z_loss = balance / n, z_loss / n
        return self.head(self.norm(h)), balance, z_loss


def batches(data: Tensor, seq: int, batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    offs = start[:, None] + torch.arange(seq + 1)  # (B, T+1)
    chunk = data[offs]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def expert_loads(model: CharLM, data: Tensor, seq: int, gen: torch.Generator) -> list[Tensor]:
    """Tokens routed to each expert, per layer, over 8 held-out batches (eval mode)."""
    model.eval()
    seen: list[Tensor] = []
    hooks = [
        blk.moe.register_forward_hook(lambda m, args, out: seen.append(m.router(args[0]).argmax(-1).flatten()))
        for blk in model.blocks
    ]
    for _ in range(8):
        model(batches(data, seq, 32, gen)[0])
    for hk in hooks:
        hk.remove()
    n_layers, e = len(model.blocks), model.blocks[0].moe.num_experts
    per_layer = [torch.cat(seen[i::n_layers]) for i in range(n_layers)]
    model.train()
    return [torch.bincount(ids, minlength=e).float() for ids in per_layer]


def run(mode: str, seed: int, args: argparse.Namespace, train: Tensor, val: Tensor, vocab: int) -> dict:
    torch.manual_seed(seed)
    moe_params = {"num_experts": 3, "hidden_dim": 4 * args.dim, "mode": mode}
    if args.router_jitter is not None:
        moe_params["router_jitter"] = args.router_jitter
    model = CharLM(vocab, args.dim, args.layers, args.heads, args.seq, moe_params, args.layer_reduce)
    routers0 = [blk.moe.router.weight.detach().clone() for blk in model.blocks]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(1 + seed)
    t0 = time.time()
    for step in range(args.steps):
        x, y = batches(train, args.seq, args.batch, gen)
        logits, balance, z_loss = model(x)
        ce = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss = ce + 0.01 * balance + 1e-3 * z_loss  # the blueprint's `losses:` weights
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  [{mode} seed {seed}] step {step:4d}  ce {ce.item():.3f}  balance {balance.item():.4f}  z {z_loss.item():.3f}")
    with torch.no_grad():
        model.eval()
        vg = torch.Generator().manual_seed(2)
        val_ce = sum(
            F.cross_entropy(model(x)[0].reshape(-1, vocab), y.reshape(-1)).item()
            for x, y in (batches(val, args.seq, 32, vg) for _ in range(8))
        ) / 8
        model.train()
    loads = expert_loads(model, val, args.seq, torch.Generator().manual_seed(3))
    ratio = [float(c.max() / c.mean()) for c in loads]
    change = [
        float((blk.moe.router.weight.detach() - w0).norm() / w0.norm()) for blk, w0 in zip(model.blocks, routers0)
    ]
    print(f"  [{mode} seed {seed}] busiest/mean per layer {[round(r, 3) for r in ratio]}  val CE {val_ce:.3f}", flush=True)
    return {
        "mode": mode,
        "seed": seed,
        "busiest_over_mean": max(ratio),
        "per_layer": ratio,
        "loads": [c.int().tolist() for c in loads],
        "router_change": max(change),
        "val_ce": val_ce,
        "seconds": time.time() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; the table ends with their mean")
    ap.add_argument("--router-jitter", type=float, default=None, help="override moe.category's router_jitter")
    ap.add_argument("--layer-reduce", choices=["sum", "mean"], default="sum",
                    help="combine the layers' aux losses: sum (Switch Transformer: every layer's loss is added "
                         "with weight alpha) or mean (the Holographic seed's convention)")
    args = ap.parse_args()

    text = args.data.read_text()
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lut[c] for c in text], dtype=torch.long)
    cut = int(0.9 * data.numel())
    train, val = data[:cut], data[cut:]

    rows = [run(mode, seed, args, train, val, len(chars)) for mode in ("fixed", "faithful") for seed in range(args.seeds)]
    print()
    print(f"{'mode':<9} | {'seed':>4} | {'busiest/mean':>12} | {'per layer':<11} | {'router change':>13} | {'val CE':>6} | {'s':>4}")
    print("-" * 81)
    for mode in ("fixed", "faithful"):
        mine = [r for r in rows if r["mode"] == mode]
        for r in mine:
            per = " ".join(f"{v:.2f}" for v in r["per_layer"])
            print(
                f"{mode:<9} | {r['seed']:>4} | {r['busiest_over_mean']:>12.3f} | {per:<11} | "
                f"{r['router_change']:>13.4f} | {r['val_ce']:>6.3f} | {r['seconds']:>4.0f}"
            )
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("busiest_over_mean", "router_change", "val_ce", "seconds")}
        per = " ".join(f"{sum(r['per_layer'][i] for r in mine) / len(mine):.2f}" for i in range(len(mine[0]["per_layer"])))
        print(
            f"{mode:<9} | {'mean':>4} | {mean['busiest_over_mean']:>12.3f} | {per:<11} | "
            f"{mean['router_change']:>13.4f} | {mean['val_ce']:>6.3f} | {mean['seconds']:>4.0f}"
        )
    for r in rows:
        print(f"{r['mode']} seed {r['seed']} loads per layer (tokens per expert): {r['loads']}")


if __name__ == "__main__":
    main()
