"""Tracing one prompt end to end: the library call behind ``circuits trace``.

1. Tokenise the prompt (``Suite.tokens`` refuses empty or too-long prompts) and build the linearised model.
2. Choose the target: the parsed text spec, or by default the most active transcoder feature at the last
   position of the deepest layer.
3. Attribute (hierarchical pass, then batched edges), checking every node's completeness identity.
4. Build the ``Circuit``; add the QK pair decomposition for an attention-score target, the replacement and
   completeness scores, and the faithfulness curve by ablation in the real model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from circuits.attribution import Attribution, attribute
from circuits.faithfulness import faithfulness_curve
from circuits.graph import Circuit, build_circuit, node_id
from circuits.influence import graph_scores
from circuits.linear_model import LinearisedModel
from circuits.qk import qk_decomposition
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
    """The most active transcoder feature at the last position of the deepest layer."""
    layer = lm.n_layers - 1
    group = lm.feature_group("mlp_feature", layer)
    pos = lm.n_pos - 1
    if not group.mask[pos].any():
        raise ValueError(f"no transcoder feature of layer {layer} is active at the last position; give --target explicitly")
    j = int(group.activation[pos].argmax())
    return FeatureTarget("mlp_feature", layer, int(group.feature[pos, j]), pos)


def trace(suite: Suite, prompt: str, target: str | Target | None = None, threshold: float = 0.01,
          batch_size: int = 64, faithfulness: bool = True, progress: bool = True) -> Trace:
    tokens = suite.tokens(prompt)
    lm = LinearisedModel(suite, tokens)
    if isinstance(target, str):
        target = parse_target(target, suite, lm.n_pos)
    target = target or default_target(lm)
    result = attribute(lm, target, threshold=threshold, batch_size=batch_size, progress=progress)
    circuit = build_circuit(lm, result, prompt, suite.name)
    circuit.scores = graph_scores(circuit)
    if isinstance(target, AttentionScoreTarget):
        qk = qk_decomposition(lm, result.index, target)
        names = lambda cols: [node_id(result.index.kind(c), result.index.layer(c), int(result.index.pos[c]),
                                      int(result.index.feature[c])) for c in cols.tolist()] + ["constant"]
        circuit.qk = dict(query_nodes=names(qk.query_cols), key_nodes=names(qk.key_cols), pairs=qk.pairs.tolist(),
                          score=qk.score, relative_residual=qk.relative_residual)
    if faithfulness:
        circuit.faithfulness = faithfulness_curve(lm, target, circuit)
    return Trace(circuit, result, lm, target)
