"""Tracing one prompt end to end: the library call behind ``circuits trace``.

1. Tokenise the prompt (``Suite.tokens`` refuses empty or too-long prompts) and build the linearised model.
2. Choose the target: the parsed text spec, or by default the most active transcoder (or cross-layer
   transcoder) feature at the last position in the deepest layer with one active there; without any, the most
   active attention feature there (``default_target``).
3. Attribute (hierarchical pass, then batched edges), checking every node's completeness identity.
4. Build the ``Circuit`` (tensors); add the QK pair decomposition for an attention-score target.
5. Graph influence, the scores, and pruning by influence (``influence.score_and_prune``): the circuit keeps
   every node and edge of step 3 and marks with ``shown`` what pruning at ``prune`` (node, edge) keeps.
6. The faithfulness curve by ablation in the real model, over nodes ranked shown first, then by influence,
   with a point at the shown view's size: it describes both the shown view and the whole circuit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from circuits.attribution import Attribution, attribute
from circuits.faithfulness import faithfulness_curve
from circuits.graph import Circuit, build_circuit
from circuits.influence import DEFAULT_PRUNE, score_and_prune
from circuits.linear_model import LinearisedModel
from circuits.qk import qk_decomposition
from circuits.sites import format_node_id
from circuits.targets import AttentionScoreTarget, FeatureTarget, Target, parse_target
from saes.suite import Suite

log = logging.getLogger(__name__)


@dataclass
class Trace:
    circuit: Circuit
    attribution: Attribution
    model: LinearisedModel
    target: Target


def default_target(lm: LinearisedModel) -> FeatureTarget:
    """The most active MLP feature (transcoder or cross-layer transcoder) at the last position, in the deepest
    layer that has one active there; failing that, the most active attention feature at the last position in the
    deepest attention-SAE layer that has one; else a ValueError asking for an explicit target."""
    pos = lm.n_pos - 1
    for kind in ("mlp_feature", "attn_feature"):
        groups = sorted((g for g in lm.groups if g.kind == kind), key=lambda g: g.layer, reverse=True)
        for group in groups:
            if group.mask[pos].any():
                j = int(torch.where(group.mask[pos], group.activation[pos], -torch.inf).argmax())
                return FeatureTarget(kind, group.layer, int(group.feature[pos, j]), pos)
    have = ", ".join(lm.suite.dictionaries()) or ("a cross-layer transcoder" if lm.suite.clt is not None else "no dictionaries")
    raise ValueError(f"no dictionary feature is active at the last position (the suite has {have}), so there is no "
                     f"default target; give one with --target, e.g. --target 'logit:\" x\"'")


def qk_table(lm: LinearisedModel, result: Attribution, target: AttentionScoreTarget) -> dict:
    """The exact (query node, key node) table of an attention-score target, with both marginals."""
    qk = qk_decomposition(lm, result.index, target)
    index = result.index
    names = lambda cols: [format_node_id(index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c]))
                          for c in cols.tolist()] + ["constant"]
    return dict(query_nodes=names(qk.query_cols), key_nodes=names(qk.key_cols), pairs=qk.pairs.tolist(), score=qk.score,
                query_marginal=qk.query_marginal.tolist(), key_marginal=qk.key_marginal.tolist(),
                relative_residual=qk.relative_residual)


def trace(suite: Suite, prompt: str, target: str | Target | None = None, threshold: float = 0.01,
          batch_size: int = 64, faithfulness: bool = True, progress: bool = True,
          prune: tuple[float, float] | None = DEFAULT_PRUNE) -> Trace:
    """Steps 1-6 of the module docstring. ``prune=None`` shows every node and edge."""
    if prune is not None:
        for name, v in zip(("node", "edge"), prune):
            if not 0 < v <= 1:
                raise ValueError(f"the {name} pruning threshold must be in (0, 1], got {v}")
    tokens = suite.tokens(prompt)
    lm = LinearisedModel(suite, tokens)
    if isinstance(target, str):
        target = parse_target(target, suite, lm.n_pos)
    target = target or default_target(lm)
    result = attribute(lm, target, threshold=threshold, batch_size=batch_size, progress=progress)
    circuit = build_circuit(lm, result, prompt, suite.name)
    if isinstance(target, AttentionScoreTarget):
        circuit.qk = qk_table(lm, result, target)
    score_and_prune(circuit, prune)
    if faithfulness:
        circuit.faithfulness = faithfulness_curve(lm, target, circuit)
    return Trace(circuit, result, lm, target)
