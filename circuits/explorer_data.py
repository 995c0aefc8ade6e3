"""The explorer's data: one JSON-serialisable, columnar dict per circuit, all that ``graph.html`` reads.

1. ``meta``: what was traced and how (model, prompt, target and its value, the exactness certificate, the
   attribution threshold, the scores, the pruning thresholds the page opens at, and a note when no feature cards
   were made).
2. ``tokens`` (one per position) and ``rows``: the residual-stream stages bottom to top, ``embeddings``, ``attn0``,
   ``mlp0``, ..., ``target``.
3. ``nodes``: columns over the circuit's node table (node 0 is the target): id, kind, row, pos, layer, feature
   (-1 if none), activation, ``attribution`` (hierarchical ``T_s`` to the target), ``influence`` (graph
   influence), label (given labels, keyed by node id or feature key such as ``mlp1:613``; else a default: the
   token for an embedding, the dictionary for an error),
   ``card`` (a key into ``cards`` or null), ``shown`` (kept by the default pruning) and ``remainder`` (the part of
   the node's input from sources the attribution threshold dropped, which the page's pruning counts as
   unexplained, as ``circuits.influence`` does).
4. ``edges``: src and dst node indices, weight, shown; at most ``max_edges`` of them (the shown ones, then the
   largest by |weight|; ``meta.n_edges_total`` counts them all). ``heads``: for each edge into an attention
   feature, its edge index, its per-head parts (summing to its weight) and its source position.
5. ``qk``: for an attention-score target, the exact (query node, key node) pair table with both marginals.
6. ``cards``: as given, keyed ``{dictionary}:{feature}``.
Non-finite numbers become null, so that the page's ``JSON.parse`` reads the result.
"""

from __future__ import annotations

from typing import Any

import torch

from circuits import sites
from circuits.explorer import finite_json
from circuits.graph import Circuit
from circuits.influence import DEFAULT_PRUNE
from circuits.sites import FEATURE_KINDS, KINDS

SCHEMA = 1
DEFAULT_MAX_EDGES = 200_000


def default_label(kind: str, layer: int, pos: int, feature: int, token: str, target: str) -> str:
    if kind == "target":
        return target
    if kind == "embed":
        return repr(token)
    if kind == "pos_embed":
        return f"position {pos}"
    name = sites.dictionary_name(kind, layer)
    if kind in sites.ERROR_KINDS:
        return f"{name} error"
    if kind == "mlp_output":
        return f"{name} output"
    return f"{name}:{feature}"


def _floats(t: torch.Tensor) -> list:
    t = t.double()
    return t.tolist() if bool(torch.isfinite(t).all()) else finite_json(t.tolist())


def explorer_payload(circuit: Circuit, cards: dict[str, dict] | None = None, labels: dict[str, str] | None = None,
                     cards_note: str | None = None, max_edges: int | None = DEFAULT_MAX_EDGES) -> dict[str, Any]:
    """Steps 1-6 of the module docstring."""
    c, labels = circuit, labels or {}
    kinds = [KINDS[k] for k in c.node_kind.tolist()]
    layers, pos, feats = c.node_layer.tolist(), c.node_pos.tolist(), c.node_feature.tolist()
    rows = sites.row_names(c.n_layers)
    row = [sites.row_of(k, l, c.n_layers) for k, l in zip(kinds, layers)]
    label, card = [], []
    for i, nid in enumerate(c.ids):
        k = kinds[i]
        label.append(sites.label_for(labels, nid) or default_label(k, layers[i], pos[i], feats[i], c.tokens[pos[i]], c.target))
        key = sites.feature_key(k, layers[i], feats[i]) if k in FEATURE_KINDS else None
        card.append(key if cards is not None and key in cards else None)
    # edges: the shown ones first, then the largest others, up to max_edges; kept in their original order
    n_total = c.n_edges
    if max_edges is not None and n_total > max_edges:
        rank = c.edge_weight.abs().double() + c.edge_shown.double() * (1 + float(c.edge_weight.abs().max()))
        sel = torch.sort(torch.topk(rank, max_edges).indices).values
    else:
        sel = torch.arange(n_total)
    new_edge = torch.full((n_total,), -1, dtype=torch.long)
    new_edge[sel] = torch.arange(len(sel))
    h_keep = new_edge[c.head_edge] >= 0
    head_edges = c.head_edge[h_keep]
    pruning = c.pruning or {"node_threshold": DEFAULT_PRUNE[0], "edge_threshold": DEFAULT_PRUNE[1]}
    if cards_note is None and not cards:
        cards_note = "no feature cards were made for this circuit"
    qk = None
    if c.qk is not None:
        pairs = torch.tensor(c.qk["pairs"], dtype=torch.float64)
        qk = dict(query_nodes=list(c.qk["query_nodes"]), key_nodes=list(c.qk["key_nodes"]), pairs=pairs.tolist(),
                  score=c.qk["score"], query_marginal=pairs.sum(1).tolist(), key_marginal=pairs.sum(0).tolist())
    payload = {
        "schema": SCHEMA,
        "meta": dict(model=c.model, prompt=c.prompt, target=c.target, target_value=c.target_value,
                     max_relative_residual=c.max_relative_residual, threshold=c.threshold, n_layers=c.n_layers,
                     n_heads=c.n_heads, scores=dict(c.scores), node_threshold=pruning["node_threshold"],
                     edge_threshold=pruning["edge_threshold"], cards_note=cards_note, n_edges_total=n_total),
        "tokens": list(c.tokens),
        "rows": rows,
        "nodes": dict(id=list(c.ids), kind=kinds, row=row, pos=pos, layer=layers, feature=feats,
                      activation=_floats(c.node_activation), attribution=_floats(c.node_attribution),
                      influence=_floats(c.node_influence), label=label, card=card, shown=c.node_shown.tolist(),
                      remainder=_floats(c.node_remainder)),
        "edges": dict(src=c.edge_src[sel].tolist(), dst=c.edge_dst[sel].tolist(), weight=_floats(c.edge_weight[sel]),
                      shown=c.edge_shown[sel].tolist()),
        "heads": dict(edge=new_edge[head_edges].tolist(), weights=_floats(c.head_weights[h_keep]),
                      src_pos=c.node_pos[c.edge_src[head_edges]].tolist()),
        "qk": finite_json(qk),
        "cards": finite_json(dict(cards or {})),
    }
    payload["meta"] = finite_json(payload["meta"])
    return payload
