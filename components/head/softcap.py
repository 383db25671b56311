"""head.softcap: logit soft-capping, every logit squashed smoothly into (-cap, cap) (Gemma 2; modded-nanogpt)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


class SoftCap(nn.Module):
    """Soft-cap the logits elementwise into (-cap, cap):

    - ``algebraic``: ``cap * x / sqrt(x^2 + cap^2)`` (modded-nanogpt, cap 15);
    - ``tanh``: ``cap * tanh(x / cap)`` (Gemma 2's final logits, cap 30: its ``final_logit_softcapping``,
      as ``blueprints/families/gemma2.yaml`` uses it).

    Both have slope 1 at 0. Shapes: x (B, T, V) -> (B, T, V), computed and returned in float32
    whatever the input dtype (the loss reads them; the speedrun casts its logits to float32
    before the cap). No parameters. A cap placed after ``head.lm`` keeps the head's
    ``logits`` from coming straight from ``head.lm``: the trainer then neither pads the
    vocabulary with -inf logits nor fuses the head with the loss, both of which would skip the cap.
    """

    def __init__(self, *, cap: float, form: Literal["algebraic", "tanh"] = "algebraic") -> None:
        super().__init__()
        self.cap = cap
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.form == "tanh":
            return self.cap * torch.tanh(x / self.cap)
        return self.cap * x * torch.rsqrt(x.square() + self.cap**2)  # (B, T, V) fp32

    def extra_repr(self) -> str:
        return f"cap={self.cap}, form={self.form!r}"


class SoftCapParams(ComponentParams):
    cap: float = Field(gt=0.0, description="the bound: outputs lie in (-cap, cap) (modded-nanogpt: 15, Gemma 2: 30)")
    form: Literal["algebraic", "tanh"] = Field(
        "algebraic", description="algebraic: cap x / sqrt(x^2 + cap^2) (modded-nanogpt); tanh: cap tanh(x / cap) (Gemma 2)")


@register(
    "head.softcap",
    params=SoftCapParams,
    decode="stateless",
    examples=[Example({"cap": 15.0}, {"x": (2, 8, 50)}), Example({"cap": 2.0, "form": "tanh"}, {"x": (2, 8, 50)})],
)
def build_softcap(p: SoftCapParams, ins: Inputs) -> SoftCap:
    return SoftCap(cap=p.cap, form=p.form)
