"""Pictures: `viz` (HTML, SVG; rendered in headless Chromium), `plot` and `viz-coords`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from physlm_graph import PhysLMError, compile_blueprint
from physlm_graph._viz import node_colour, render_html, render_svg
from physlm_graph.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY = {"params.layers": 2, "params.dim": 32, "params.heads": 2, "params.context": 16, "train.seq_len": 16}

NGT = """
physlm: 1
name: tiny-ngt
params: {vocab: 40, dim: 16, context: 16}
nodes:
  tok:  {use: embed.token, in: tokens, vocab_size: "${vocab}", embed_dim: "${dim}"}
  z0:   {use: embed.ngt_coords, in: tokens, max_len: "${context}", coord_dim: 6}
  mass: {use: embed.ngt_mass, in: tokens, vocab_size: "${vocab}"}
  ln1:  {use: norm.layer, in: tok}
  g1:   {use: attention.gravity, in: {x: ln1, z: z0, mass: mass}, num_heads: 2, head_coord_dim: 4, dropout: 0.0}
  r1:   {use: add, in: [tok, g1]}
  ln2:  {use: norm.layer, in: r1}
  g2:   {use: attention.gravity, in: {x: ln2, z: g1.z_next, mass: mass}, num_heads: 2, head_coord_dim: 4, dropout: 0.0}
  r2:   {use: add, in: [r1, g2]}
  head: {use: head.lm, in: r2, vocab_size: "${vocab}"}
outputs: {logits: head}
train: {seq_len: 16}
"""


@pytest.fixture(scope="module")
def cm():
    return compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides=TINY, device="meta", build=False)


def test_html_is_offline_and_shows_every_node(cm, tmp_path):
    page = render_html(cm)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched
    for path, spec in cm.resolved.nodes.items():
        assert f'id="n-{path}"' in page and spec.use in page
    assert page.count('<details class="block"') == 2  # trunk.0, trunk.1: collapsible
    assert "[batch, seq, 32]" in page and "hidden_dim=128" in page  # shape and resolved params
    svg = render_svg(cm)
    assert svg.startswith("<svg") and svg.count('class="node"') == len(cm.resolved.nodes)


def test_cli_refuses_an_unknown_picture_format(tmp_path, capsys):
    assert main(["viz", str(ROOT / "blueprints" / "baby-gpt.yaml"), "-o", str(tmp_path / "g.pdf")]) == 2
    assert "expected .html or .svg" in capsys.readouterr().err


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_nodes(tmp_path):
    out = tmp_path / "graph.html"
    assert main(["viz", str(ROOT / "blueprints" / "baby-gpt.yaml"), "--set", "params.layers=2", "-o", str(out)]) == 0
    dom = _chromium(out.as_uri(), tmp_path, "--dump-dom").stdout
    assert "trunk.1.attn" in dom and "attention.causal" in dom
    shot = tmp_path / "shot.png"
    _chromium(out.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.is_file()
    Image = pytest.importorskip("PIL.Image")
    img = Image.open(shot).convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    for use in ("embed.token", "attention.causal", "ffn.mlp", "norm.layer"):  # node cards painted
        want = tuple(int(node_colour(use)[i:i + 2], 16) for i in (1, 3, 5))
        assert want in colours, use


def test_plot_draws_train_and_val_curves(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for name, scale in (("a", 1.0), ("b", 1.2)):
        run = tmp_path / name
        run.mkdir()
        lines = [json.dumps({"step": s, "loss": scale * 4 / s ** 0.3, **({"val_loss": scale * 4.2 / s ** 0.3}
                                                                          if s % 5 == 0 else {})})
                 for s in range(1, 21)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 21, "lo')  # cut last line
        runs.append(str(run))
    out = tmp_path / "curves.png"
    assert main(["plot", *runs, "-o", str(out), "--json"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing"), "-o", str(out)]) == 2


def test_viz_coords_writes_a_self_contained_3d_view(tmp_path, capsys):
    from physlm_graph.runtime.checkpoint import save_checkpoint

    bp = tmp_path / "ngt.yaml"
    bp.write_text(NGT)
    ngt = compile_blueprint(bp)
    save_checkpoint(tmp_path / "ckpt", cm=ngt)
    out = tmp_path / "coords.html"
    assert main(["viz-coords", str(tmp_path / "ckpt"), "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == 40 and info["layer"] == "g2" 
    v = info["variance"]  # shares of variance of the 3 kept components: descending, at most 1 in all
    assert v == sorted(v, reverse=True) and 0.5 < sum(v) <= 1 + 1e-6
    page = out.read_text()
    data = json.loads(re.search(r'id="data">(.*?)</script>', page).group(1))
    assert len(data["points"]) == 40 and all(len(p) == 3 for p in data["points"])
    with torch.no_grad():  # dot sizes are the model's masses: softplus(E_mass[id])
        want = torch.nn.functional.softplus(ngt.module.mass.weight[:, 0])
    assert torch.allclose(torch.tensor(data["mass"]), want, atol=1e-5)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert main(["viz-coords", str(tmp_path / "ckpt"), "-o", str(out)]) == 0


def test_viz_coords_refuses_a_model_without_coordinates(tmp_path, capsys):
    from physlm_graph.runtime.checkpoint import save_checkpoint

    gpt = compile_blueprint(ROOT / "blueprints" / "baby-gpt.yaml", overrides=TINY)
    save_checkpoint(tmp_path / "ckpt", cm=gpt)
    assert main(["viz-coords", str(tmp_path / "ckpt"), "-o", str(tmp_path / "c.html")]) == 2
    assert "has no attention.gravity node" in capsys.readouterr().err
