"""``physlm-graph viz-coords CKPT -o coords.html``: where an NGT model puts its tokens.

The Newton Gravity Transformer carries coordinates ``z`` beside the hidden state: ``embed.ngt_coords``
gives the first ones, every ``attention.gravity`` layer the next (its ``z_next`` port), and
``embed.ngt_mass`` gives each token a mass. This command runs the checkpoint on probe tokens
(a text, or the vocabulary itself in context-sized chunks), takes the coordinates of the *last*
gravity layer, projects them to 3D with PCA, and writes a self-contained page: a canvas the
reader rotates by dragging, one dot per token, the dot's area proportional to its mass.
No CDN: the drawing script is the few lines in ``JS`` below.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from physlm_graph._errors import PhysLMError

__all__ = ["token_coordinates", "pca3", "render_coords_html", "add_commands"]


def _ngt_nodes(cm: Any) -> tuple[str, str | None]:
    gravity = [p for p, n in cm.resolved.nodes.items() if n.use == "attention.gravity"]
    if not gravity:
        raise PhysLMError(f"the model {cm.name!r} has no attention.gravity node: it has no token coordinates",
                          fix="viz-coords is for NGT models (embed.ngt_coords + attention.gravity + embed.ngt_mass)")
    mass = [p for p, n in cm.resolved.nodes.items() if n.use == "embed.ngt_mass"]
    return gravity[-1], (mass[0] if mass else None)


@torch.no_grad()
def token_coordinates(cm: Any, ids: list[int], context: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Final coordinates (N, c) and masses (N,) of ``ids``, run in chunks of ``context`` tokens."""
    last, mass_node = _ngt_nodes(cm)
    mods = dict(cm.module.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [mods[last].register_forward_hook(lambda m, i, o: got.__setitem__("z", o[1]))]
    if mass_node is not None:
        hooks.append(mods[mass_node].register_forward_hook(lambda m, i, o: got.__setitem__("m", o)))
    zs, ms = [], []
    try:
        cm.module.eval()
        for start in range(0, len(ids), context):
            chunk = torch.tensor([ids[start:start + context]], dtype=torch.long, device=next(cm.module.parameters()).device)
            cm.module(chunk)
            zs.append(got["z"][0].float().cpu())  # (T, c)
            if "m" in got:
                ms.append(got["m"][0, :, 0].float().cpu())  # (T,)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(zs), (torch.cat(ms) if ms else None), last


def pca3(z: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The first three principal components of rows of ``z`` (N, c) -> (N, 3), and the share of variance each explains."""
    zc = z - z.mean(dim=0, keepdim=True)
    _, s, v = torch.linalg.svd(zc, full_matrices=False)
    k = min(3, v.size(0))
    p = zc @ v[:k].T  # (N, k)
    if k < 3:
        p = torch.cat([p, p.new_zeros(p.size(0), 3 - k)], dim=1)
    var = (s ** 2) / (s ** 2).sum().clamp_min(1e-12)
    return p, [float(x) for x in var[:3]]


JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const cv = document.getElementById('cv'), cx = cv.getContext('2d');
let yaw = 0.6, pitch = 0.35, drag = null;
const span = Math.max(...D.points.flat().map(Math.abs), 1e-9);
const mmax = Math.max(...D.mass, 1e-9);
function draw(){
  cx.clearRect(0,0,cv.width,cv.height);
  const cy=Math.cos(yaw), sy=Math.sin(yaw), cp=Math.cos(pitch), sp=Math.sin(pitch);
  const s = 0.42*Math.min(cv.width,cv.height)/span;
  const pts = D.points.map((p,i)=>{const x=cy*p[0]+sy*p[2], z=-sy*p[0]+cy*p[2];
    const y=cp*p[1]-sp*z, d=sp*p[1]+cp*z; return {x:cv.width/2+s*x, y:cv.height/2-s*y, d:d, i:i};});
  pts.sort((a,b)=>a.d-b.d);  // far first: near dots drawn over far ones
  for (const q of pts){
    const r = 2+10*Math.sqrt(D.mass[q.i]/mmax);
    cx.beginPath(); cx.arc(q.x,q.y,r,0,2*Math.PI);
    cx.fillStyle = 'hsla('+Math.round(300*q.i/Math.max(D.points.length-1,1))+',70%,45%,0.75)'; cx.fill();
    if (D.points.length <= 300){ cx.fillStyle='#222'; cx.font='11px monospace'; cx.fillText(D.labels[q.i], q.x+r+1, q.y+4); }
  }
}
cv.onmousedown = e => drag = [e.clientX, e.clientY];
window.onmouseup = () => drag = null;
window.onmousemove = e => { if(!drag) return; yaw += (e.clientX-drag[0])*0.01; pitch += (e.clientY-drag[1])*0.01;
  drag = [e.clientX, e.clientY]; draw(); };
draw();
"""


def render_coords_html(points: torch.Tensor, mass: list[float], labels: list[str], title: str, note: str) -> str:
    data = {"points": [[round(float(v), 5) for v in p] for p in points], "mass": mass, "labels": labels}
    blob = json.dumps(data).replace("</", "<\\/")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            '<style>body{font-family:system-ui,sans-serif;margin:16px}canvas{border:1px solid #ccc;cursor:grab}'
            '.note{color:#555}</style></head>'
            f'<body><h1 style="font-size:20px">{html.escape(title)}</h1><div class="note">{html.escape(note)}</div>'
            '<canvas id="cv" width="900" height="700"></canvas>'
            f'<script type="application/json" id="data">{blob}</script><script>{JS}</script></body></html>\n')


def _label(tok: Any, i: int) -> str:
    if tok is None:
        return str(i)
    try:
        return repr(tok.decode([i]))[1:-1] or str(i)
    except Exception:
        return str(i)


def cmd_viz_coords(args: Any) -> int:
    import sys

    from physlm_graph.runtime.checkpoint import load_checkpoint, model_context, model_vocab

    ck = load_checkpoint(args.checkpoint)
    cm = ck.model
    context = model_context(cm) or 256
    if args.text is not None:
        if ck.tokenizer is None:
            raise PhysLMError("--text needs the checkpoint's tokenizer, and this checkpoint has none",
                              fix="leave out --text to show the whole vocabulary")
        ids = ck.tokenizer.encode(args.text)
    else:
        ids = list(range(min(model_vocab(cm) or 0, args.max_tokens)))
    if not ids:
        raise PhysLMError("no probe tokens", fix="give --text or a model with a vocabulary")
    z, m, layer = token_coordinates(cm, ids, context)
    p, var = pca3(z)
    mass = [float(v) for v in m] if m is not None else [1.0] * len(ids)
    labels = [_label(ck.tokenizer, i) for i in ids]
    note = (f"final coordinates ({layer}.z_next, {z.size(1)} dims) of {len(ids)} tokens, PCA to 3D "
            f"(variance explained {', '.join(f'{v:.0%}' for v in var)}); dot area ~ mass; drag to rotate")
    Path(args.output).write_text(render_coords_html(p, mass, labels, f"{cm.name}: token coordinates", note),
                                 encoding="utf-8")
    if args.json:
        print(json.dumps({"output": args.output, "tokens": len(ids), "layer": layer, "variance": var}))
    else:
        print(f"wrote {args.output} ({len(ids)} tokens)", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    from physlm_graph._cliargs import positive_int

    v = sub.add_parser("viz-coords", help="3D view of an NGT checkpoint's token coordinates (self-contained HTML)")
    v.add_argument("checkpoint", help="a checkpoint or run folder")
    v.add_argument("-o", "--output", required=True, help="coords.html")
    v.add_argument("--text", default=None, help="probe text (default: the vocabulary)")
    v.add_argument("--max-tokens", type=positive_int, default=2048, help="at most this many vocabulary tokens")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_viz_coords)
