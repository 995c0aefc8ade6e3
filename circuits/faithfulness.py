"""Faithfulness and completeness of a circuit by ablation in the real model with the dictionaries spliced in.

Algorithm (Marks et al. 2024, "Sparse Feature Circuits"):

1. Splice every dictionary into the *real* model (nothing frozen: patterns, LayerNorm scales and feature
   activations are recomputed): ``hook_z <- attn_sae(z) + error_z`` and
   ``hook_mlp_out <- transcoder(ln2_in) + error_mlp``, with each error computed in the same run. With nothing
   ablated this is the model itself. Only the suite's dictionaries are spliced: attention without an SAE runs
   as it is, and an MLP without a transcoder is one node per position (``mlp_output``), ablated like an error.
2. Ablate a node by *zero ablation*: a feature's activation, or an error vector at one position, is set to 0
   (decoder biases stay). Embeddings are never ablated: the circuit explains what the model does with its input.
3. The metric m is the target itself (feature pre-activation, logit or logit difference, attention score, or
   the direction at its hook), read from the same run.
4. ``F(C) = (m(C) - m(empty)) / (m(M) - m(empty))`` where m(C) ablates every feature and error node outside C
   (inactive features included), m(M) ablates nothing and m(empty) ablates everything. Completeness is
   ``F(M minus C)``, the model with only C ablated: near 0 means C holds what matters.
5. The curve: C = the first k feature, error and MLP-output nodes of the circuit ranked shown first, then by
   graph influence, for k = 0, 1, 2, 4, ..., the number of shown ones, and all of them. The row whose
   ``n_nodes`` is the shown count has ``shown: true``: the faithfulness of the view pruning shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from circuits.graph import Circuit, Node
from circuits.linear_model import LinearisedModel, skip_weight
from circuits.sites import ERROR_KINDS, FEATURE_KINDS, TOKEN_KINDS
from circuits.targets import AttentionScoreTarget, DirectionTarget, FeatureTarget, LogitTarget, Target
from saes.dictionary import decode, encode, pre_activation
from saes.suite import flatten_z

log = logging.getLogger(__name__)


@dataclass
class Ablation:
    """What survives: ``features[(kind, layer)]`` is a [pos, d_sae] keep-mask, ``errors[(kind, layer)]`` a [pos] one
    (``errors[("mlp_output", layer)]`` for the whole MLP output of a layer without a transcoder).

    A missing key keeps everything of that dictionary.
    """

    features: dict[tuple[str, int], Bool[Tensor, "pos d_sae"]]
    errors: dict[tuple[str, int], Bool[Tensor, "pos"]]


def run_spliced(lm: LinearisedModel, target: Target, ablation: Ablation) -> float:
    """Step 1-3: the metric of one forward pass of the real model with the dictionaries spliced in."""
    model, suite = lm.model, lm.suite
    seen: dict[str, Tensor] = {}

    def splice_attn(z, hook):
        layer = hook.layer()
        if layer not in suite.attn_saes:
            return z
        sae = suite.attn_saes[layer]
        flat = flatten_z(z[0])
        acts = encode(sae, flat)
        error = flat - decode(sae, acts)
        keep = ablation.features.get(("attn_feature", layer))
        keep_err = ablation.errors.get(("attn_feature", layer))
        if isinstance(target, FeatureTarget) and target.kind == "attn_feature" and target.layer == layer:
            seen["metric"] = pre_activation(sae, flat)[target.pos, target.feature]
        acts = acts if keep is None else acts * keep
        error = error if keep_err is None else error * keep_err[:, None]
        return (decode(sae, acts) + error).reshape(z.shape)

    def capture_ln2(x, hook):
        seen[f"ln2.{hook.layer()}"] = x[0]

    clt_acts: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (activations, after ablation)

    def splice_clt(out, hook):
        """A cross-layer transcoder: this layer's features, then every layer <= this one written into its output."""
        layer, clt = hook.layer(), suite.clt
        x = seen[f"ln2.{layer}"]
        if isinstance(target, FeatureTarget) and target.kind == "mlp_feature" and target.layer == layer:
            seen["metric"] = clt.pre_activation(layer, x)[target.pos, target.feature]
        acts = clt.encode(layer, x)
        keep = ablation.features.get(("mlp_feature", layer))
        clt_acts[layer] = (acts, acts if keep is None else acts * keep)
        full = clt.b_dec[layer] + sum(clt_acts[l][0] @ clt.W_dec[l][:, layer - l] for l in range(layer + 1))
        kept = clt.b_dec[layer] + sum(clt_acts[l][1] @ clt.W_dec[l][:, layer - l] for l in range(layer + 1))
        error = out[0] - full
        keep_err = ablation.errors.get(("mlp_feature", layer))
        error = error if keep_err is None else error * keep_err[:, None]
        return (kept + error)[None]

    def splice_mlp(out, hook):
        layer = hook.layer()
        if suite.clt is not None:
            return splice_clt(out, hook)
        if layer not in suite.transcoders:  # the whole output is one node per position
            keep_out = ablation.errors.get(("mlp_output", layer))
            return out if keep_out is None else out * keep_out[:, None]
        tc = suite.transcoders[layer]
        x = seen[f"ln2.{layer}"]
        acts = encode(tc, x)
        W_skip = skip_weight(tc)
        skip = x @ W_skip.T if W_skip is not None else 0.0  # a linear path of the transcoder: never ablated
        error = out[0] - decode(tc, acts) - skip
        if isinstance(target, FeatureTarget) and target.kind == "mlp_feature" and target.layer == layer:
            seen["metric"] = pre_activation(tc, x)[target.pos, target.feature]
        keep = ablation.features.get(("mlp_feature", layer))
        keep_err = ablation.errors.get(("mlp_feature", layer))
        acts = acts if keep is None else acts * keep
        error = error if keep_err is None else error * keep_err[:, None]
        return (decode(tc, acts) + skip + error)[None]

    def capture(x, hook):
        seen[hook.name] = x[0]

    hooks = []
    for layer in range(lm.n_layers):
        hooks += [(f"blocks.{layer}.attn.hook_z", splice_attn), (f"blocks.{layer}.ln2.hook_normalized", capture_ln2),
                  (f"blocks.{layer}.hook_mlp_out", splice_mlp)]
    if isinstance(target, AttentionScoreTarget):
        hooks.append((f"blocks.{target.layer}.attn.hook_attn_scores", capture))
    if isinstance(target, DirectionTarget):
        hooks.append((target.hook, capture))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):  # hooks are removed on exit, also on error
        logits = model(lm.tokens)[0]
    if isinstance(target, LogitTarget):
        return float(sum(c * logits[target.pos, t] for t, c in zip(target.tokens, target.coefficients)))
    if isinstance(target, AttentionScoreTarget):
        return float(seen[f"blocks.{target.layer}.attn.hook_attn_scores"][target.head, target.query_pos, target.key_pos])
    if isinstance(target, DirectionTarget):
        x = seen[target.hook]
        x = flatten_z(x) if target.hook.endswith("hook_z") else x
        return float(x[target.pos] @ torch.tensor(target.direction, dtype=x.dtype, device=x.device))
    return float(seen["metric"])


def ablation_keeping(lm: LinearisedModel, nodes: list[Node], complement: bool = False) -> Ablation:
    """Keep exactly the feature and error ``nodes`` (or, with ``complement``, everything but them)."""
    features, errors = {}, {}
    clt = lm.suite.clt
    mlp = {l: lm.dictionary("mlp_feature", l) for l in range(lm.n_layers)} if clt is not None else lm.suite.transcoders
    for layer in range(lm.n_layers):
        if layer not in mlp:
            errors[("mlp_output", layer)] = torch.full((lm.n_pos,), complement, dtype=torch.bool, device=lm.device)
        for kind, store in (("attn_feature", lm.suite.attn_saes), ("mlp_feature", mlp)):
            if layer not in store:
                continue
            d_sae = store[layer].cfg.d_sae
            features[(kind, layer)] = torch.full((lm.n_pos, d_sae), complement, dtype=torch.bool, device=lm.device)
            errors[(kind, layer)] = torch.full((lm.n_pos,), complement, dtype=torch.bool, device=lm.device)
    for n in nodes:
        if n.kind in FEATURE_KINDS:
            features[(n.kind, n.layer)][n.pos, n.feature] = not complement
        elif n.kind in ERROR_KINDS:
            errors[(n.kind.replace("error", "feature"), n.layer)][n.pos] = not complement
        elif n.kind == "mlp_output":
            errors[("mlp_output", n.layer)][n.pos] = not complement
    return Ablation(features, errors)


def faithfulness_curve(lm: LinearisedModel, target: Target, circuit: Circuit, max_points: int = 12) -> list[dict[str, float]]:
    """Steps 4-5: rows ``{n_nodes, faithfulness, completeness, metric, shown}`` for growing circuits."""
    ranked = sorted((n for n in circuit.nodes() if n.kind not in TOKEN_KINDS and n.kind != "target"),
                    key=lambda n: (not n.shown, -abs(n.influence)))
    n_shown = sum(n.shown for n in ranked)
    m_full = run_spliced(lm, target, Ablation({}, {}))
    m_empty = run_spliced(lm, target, ablation_keeping(lm, []))
    span = m_full - m_empty
    sizes = sorted({0, n_shown, len(ranked)} | {min(2**i, len(ranked)) for i in range(max_points)})
    rows = []
    for k in sizes:
        chosen = ranked[:k]
        m_c = run_spliced(lm, target, ablation_keeping(lm, chosen))
        m_rest = run_spliced(lm, target, ablation_keeping(lm, chosen, complement=True))
        rows.append(dict(
            n_nodes=k, metric=m_c, shown=k == n_shown,
            faithfulness=(m_c - m_empty) / span if span != 0 else float("nan"),
            completeness=(m_rest - m_empty) / span if span != 0 else float("nan"),
        ))
    log.info("faithfulness: m(M)=%.4g m(empty)=%.4g; F(all %d nodes)=%.3f", m_full, m_empty, len(ranked), rows[-1]["faithfulness"])
    return rows
