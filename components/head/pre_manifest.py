"""head.pre_manifest: QLLM's PreManifestResonanceLayer, an LM head that refines its query by
attending over the output vocabulary a few times before producing logits."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from physlm_graph import ComponentParams, Example, Inputs, register


def token_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class PreManifestHead(nn.Module):
    """QLLM's PreManifestResonanceLayer (``sschepis/qllm@6a5cb1a``, ``src/model/pre_manifest_layer.py``),
    the original model's LM head.

    Math, with an untied output embedding E (V x D, init N(0, 0.02^2)) and vocabulary bias b_v::

        q_0 = W_q LN(h) + b_q
        for t < K:                                 K = iterations
            l_t = q_t E^T + b_v;  p_t = softmax(l_t)
            stop if entropy(p_t) < entropy_threshold for every token of the batch
            q_{t+1} = q_t + Dropout(W_o (p_t E) + b_o)
        logits = q_final E^T + b_v

    Shapes: h (B, T, D) -> logits (B, T, V). Per-token (no mixing along the sequence).

    Cost: without halting, K + 1 vocabulary-sized matmuls forward (plus K (B T, V) x (V, D)
    reads of E), about (2K + 1)x a plain LM head, and K softmaxes of shape (B, T, V) are kept
    for backward: heavy at V = 50257.

    Published behaviour kept as is, flagged:

    - the halting test is one decision for the whole batch (``(entropy < eps).all()``), so in
      principle whether earlier tokens get another refinement can depend on later tokens (and
      on other sequences of the batch). It needs every token below eps nats (0.05 by default),
      which a language model essentially never reaches, so in practice all K iterations run and
      the head is per-token and causal; set ``entropy_threshold: 0`` to rule halting out. The
      check reads a tensor on the host (a device sync per iteration); on meta it is skipped
      (the worst case: all K iterations).
    - the padding-mask term of the original is constant across the vocabulary and cancels in
      softmax, so it is not reproduced.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        vocab_size: int,
        iterations: int = 5,
        entropy_threshold: float = 0.05,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.iterations = iterations
        self.entropy_threshold = entropy_threshold
        self.ln = nn.LayerNorm(embed_dim)
        self.query = nn.Linear(embed_dim, embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)
        self.embedding = nn.Parameter(torch.empty(vocab_size, embed_dim))
        nn.init.normal_(self.embedding, mean=0.0, std=0.02)
        self.vocab_bias = nn.Parameter(torch.zeros(vocab_size))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        q = self.query(self.ln(h))  # (B, T, D)
        for _ in range(self.iterations):  # a small fixed number of refinements
            logits = q @ self.embedding.T + self.vocab_bias  # (B, T, V)
            if not h.is_meta and self.entropy_threshold > 0:
                if bool((token_entropy(logits) < self.entropy_threshold).all()):
                    return logits  # = q_final E^T + b_v with q_final = q
            p = torch.softmax(logits, dim=-1)  # (B, T, V)
            q = q + self.drop(self.out(p @ self.embedding))  # (B, T, D)
        return q @ self.embedding.T + self.vocab_bias  # (B, T, V)


class PreManifestParams(ComponentParams):
    vocab_size: int = Field(gt=0, description="number of output tokens V")
    iterations: int = Field(5, ge=0, description="maximum refinements K (pre_manifest_iterations)")
    entropy_threshold: float = Field(
        0.05, ge=0.0, description="stop when every token's entropy (nats) is below this; 0 never stops"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on each query update")


@register(
    "head.pre_manifest",
    params=PreManifestParams,
    inputs=("h",),
    outputs=("logits",),
    decode="stateless",
    flags=("halting is one decision over the whole batch (never fires in practice)",),
    examples=[
        Example({"vocab_size": 40}, {"h": (2, 8, 16)}),
        Example({"vocab_size": 40, "iterations": 2, "entropy_threshold": 0.0, "dropout": 0.0}, {"h": (2, 8, 16)}),
    ],
)
def build_pre_manifest(p: PreManifestParams, ins: Inputs) -> PreManifestHead:
    return PreManifestHead(
        embed_dim=ins["h"].dim,
        vocab_size=p.vocab_size,
        iterations=p.iterations,
        entropy_threshold=p.entropy_threshold,
        dropout=p.dropout,
    )


__all__ = ["PreManifestHead", "PreManifestParams", "token_entropy"]
