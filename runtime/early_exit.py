"""Early exit: exit losses for training, exit rules, and a segment executor that decodes with exits.

    extra, terms = exit_losses(cm, out, y)                  # the trainer's objective adds these
    ids, stats = generate_with_exits(cm, prompt, max_new_tokens=200, threshold=0.9)
    stats.mean_layers, stats.full_layers                    # layers used per token vs full depth

The compiler gives every exit point a readout in the graph (``exit_logits``; see
``docs/early-exit.md``): shared exits call the final norm and head again, ``own`` exits have
``exits.<i>.norm``/``exits.<i>.head`` modules, saved in checkpoints like any other weight.

Data-dependent control flow lives here, not in the fx graph. ``SegmentExecutor`` cuts the
GraphModule into segments, one per exit (the nodes needed for that exit's hidden state that
no earlier segment computes) plus the final one, each a small GraphModule sharing the model's
submodules, and runs them in turn, stopping at the first exit whose rule fires.

The KV caches of the layers a token skips are filled in one of two ways (``kv_fill``):

- ``"lazy"`` (default, exact): the token's state at its exit waits in a queue, and the next
  token that reaches a skipped segment runs it on the waiting rows and itself in one chunk (the
  KV caches take the rows in position order). The caches hold exactly what the full-depth model
  would have written, so perplexity under the policy measured by a full forward
  (``policy_logits``) is the perplexity generation sees; but no layer compute is saved, only
  batched.
- ``"propagate"`` (CALM's state propagation, approximate): the skipped layers' keys and values
  are computed from the exit hidden state: for every ``attention.causal`` node in the skipped
  segments, only the nodes between the layer input and the attention (the pre-norm) and the K/V
  rows of its ``qkv`` projection run, on the exit state. Layer compute is saved; later tokens
  attend to approximate K/V. Blueprints whose skipped segments hold another cached component
  (an SSM state, a memory) fall back to lazy, with a warning and ``stats.kv_note``.

The feature lives in three files, re-exported here: ``exit_rules.py`` (rules, exit points and
depths, exit losses, the policy on whole sequences), ``exit_segments.py`` (the cut of the graph
into segments, the K/V fillers of ``propagate``) and ``exit_decode.py`` (the executor and
``generate_with_exits``).
"""

from __future__ import annotations

from .exit_decode import KV_FILLS, ExitStats, SegmentExecutor, generate_with_exits
from .exit_rules import (
    IGNORE,
    RULES,
    ExitScorer,
    _check_rule,
    _fires_now,
    exit_depths,
    exit_fires,
    exit_loss_weights,
    exit_losses,
    exit_points,
    exit_score,
    never_fires,
    policy_logits,
)
from .exit_segments import cut_for

__all__ = [
    "RULES",
    "IGNORE",
    "exit_score",
    "exit_fires",
    "never_fires",
    "exit_points",
    "exit_depths",
    "exit_loss_weights",
    "exit_losses",
    "policy_logits",
    "ExitScorer",
    "SegmentExecutor",
    "ExitStats",
    "KV_FILLS",
    "generate_with_exits",
    "cut_for",
    "_check_rule",
    "_fires_now",
]
