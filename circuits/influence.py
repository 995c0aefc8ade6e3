"""Graph influence, the replacement and completeness scores, and pruning by influence, on the circuit's tensors.

Algorithm (Ameisen et al. 2025, "Circuit Tracing", graph scores and pruning; circuit-tracer's ``prune_graph``):

1. Normalise the adjacency by row, sparsely (one entry per edge): ``N[dst, src] = |w| / (sum of |w| into dst +
   |remainder_dst|)``. The remainder (the part from sources the threshold dropped) counts as unexplained mass,
   like an error node; with ``--threshold 0`` it is zero and these are the paper's definitions.
2. Influence: ``I = e_target (N + N^2 + N^3 + ...)``. Every edge goes from a lower stage to a higher one, so one
   sweep gives it exactly: a node's influence is ``sum over its out-edges of N[dst, src] * (I[dst] + [dst is the
   target])``; reading the in-edges of each stage's nodes from the top stage down, those nodes' own influence is
   final when their in-edges are read (all their out-edges reach higher stages). Each edge is read once.
3. Replacement score: influence reaching the embeddings over influence reaching the embeddings, the error and
   MLP-output nodes and the remainders. Completeness score: the influence-weighted share of each node's input
   that comes from neither error nodes nor remainders.
4. Pruning (circuit-tracer's rule): keep the nodes whose influence is in the top ``node_threshold`` of the total
   (the smallest set of largest influences covering that fraction), the target always, the embeddings whatever
   their influence; then, on the adjacency among kept nodes renormalised, score each edge by
   ``N[dst, src] * (I[dst] + [dst is the target])`` and keep the top ``edge_threshold`` of the total the same way.
   Then, until nothing changes, drop nodes left without a kept out-edge (the target aside) and features left
   without a kept in-edge, and the edges of dropped nodes. Unlike circuit-tracer, an embedding without a kept
   out-edge is dropped too, so that the view holds only tokens that matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.graph import Circuit
from circuits.sites import FEATURE_KINDS, TOKEN_KINDS, UNEXPLAINED_KINDS

log = logging.getLogger(__name__)

DEFAULT_PRUNE = (0.8, 0.98)


@dataclass(frozen=True)
class Adjacency:
    """The normalised adjacency of a set of edges (step 1): ``norm[e] = N[dst_e, src_e]``, ``lost[i]`` the share of
    node i's input that is remainder."""

    src: Int[Tensor, "e"]
    dst: Int[Tensor, "e"]
    norm: Float[Tensor, "e"]
    lost: Float[Tensor, "n"]


def adjacency(circuit: Circuit, edge_mask: Bool[Tensor, "e"] | None = None,
              remainder: Float[Tensor, "n"] | None = None) -> Adjacency:
    src, dst, w = circuit.edge_src, circuit.edge_dst, circuit.edge_weight.double().abs()
    if edge_mask is not None:
        src, dst, w = src[edge_mask], dst[edge_mask], w[edge_mask]
    rem = (circuit.node_remainder if remainder is None else remainder).double().abs()
    denom = torch.zeros(circuit.n_nodes, dtype=torch.float64).index_add_(0, dst, w) + rem
    denom = denom.clamp(min=1e-300)
    return Adjacency(src, dst, w / denom[dst], rem / denom)


def _stage_runs(edge_stage: Int[Tensor, "e"]) -> tuple[Int[Tensor, "e"] | None, list[tuple[int, int, int]]]:
    """Edges grouped by the stage of their destination, top stage first: ``(order, [(stage, start, stop)])``.

    The circuit's edges come grouped by destination (readers in batches, nodes in stage order), so the groups are
    usually runs already and ``order`` is None; otherwise one sort makes them so."""
    order = None
    for attempt in range(2):
        s = edge_stage if order is None else edge_stage[order]
        if len(s) == 0:
            return order, []
        change = (s[1:] != s[:-1]).nonzero()[:, 0] + 1
        starts = [0] + change.tolist()
        stops = starts[1:] + [len(s)]
        stages = s[starts].tolist()
        if len(set(stages)) == len(stages):
            return order, sorted(zip(stages, starts, stops), reverse=True)
        order = torch.argsort(edge_stage, descending=True, stable=True)
    raise AssertionError("sorted edge stages must form one run per stage")


def influence(circuit: Circuit, adj: Adjacency | None = None) -> Float[Tensor, "n"]:
    """Step 2: the influence of every node on the target (node 0, which gets 0).

    The sweep goes over the destinations' stages from the top down: when the in-edges of the nodes of stage t are
    read, those nodes' own influence is final (their out-edges all reach higher stages)."""
    adj = adj or adjacency(circuit)
    order, runs = _stage_runs(circuit.node_stage[adj.dst])
    src, dst, norm = (adj.src, adj.dst, adj.norm) if order is None else (adj.src[order], adj.dst[order], adj.norm[order])
    out = torch.zeros(circuit.n_nodes, dtype=torch.float64)
    for _, start, stop in runs:
        weight = out.clone()  # I[dst] + [dst is the target]
        weight[0] += 1.0
        sl = slice(start, stop)
        out.index_add_(0, src[sl], norm[sl] * weight[dst[sl]])
    out[0] = 0.0
    return out


def graph_scores(circuit: Circuit, adj: Adjacency | None = None, infl: Float[Tensor, "n"] | None = None) -> dict[str, float]:
    """Step 3: ``replacement`` and ``completeness`` scores, both in [0, 1]."""
    adj = adj or adjacency(circuit)
    infl = influence(circuit, adj) if infl is None else infl
    weight = infl.clone()
    weight[0] = 1.0
    is_unexplained = circuit.kind_mask(*UNEXPLAINED_KINDS)
    token = float(infl[circuit.kind_mask(*TOKEN_KINDS)].sum())
    error = float(infl[is_unexplained].sum()) + float((weight * adj.lost).sum())
    n = circuit.n_nodes
    from_error = torch.zeros(n, dtype=torch.float64).index_add_(0, adj.dst, adj.norm * is_unexplained[adj.src])
    total_in = torch.zeros(n, dtype=torch.float64).index_add_(0, adj.dst, adj.norm)
    non_error = 1 - from_error - adj.lost
    has_inputs = total_in + adj.lost > 0
    completeness = float((non_error * weight)[has_inputs].sum() / weight[has_inputs].sum().clamp(min=1e-300))
    replacement = token / (token + error) if token + error > 0 else float("nan")
    return {"replacement": replacement, "completeness": completeness}


def _top_fraction(scores: Float[Tensor, "k"], fraction: float) -> float:
    """The smallest score kept when keeping the largest scores that cover ``fraction`` of their total."""
    if len(scores) == 0:
        return float("inf")
    ordered = torch.sort(scores, descending=True).values
    total = ordered.sum()
    if total <= 0:
        return 0.0
    cum = torch.cumsum(ordered, 0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), len(ordered) - 1)
    return float(ordered[i])


@dataclass(frozen=True)
class Pruning:
    """The nodes and edges pruning keeps (step 4)."""

    nodes: Bool[Tensor, "n"]
    edges: Bool[Tensor, "e"]
    node_threshold: float
    edge_threshold: float


def prune(circuit: Circuit, node_threshold: float = DEFAULT_PRUNE[0], edge_threshold: float = DEFAULT_PRUNE[1],
          infl: Float[Tensor, "n"] | None = None) -> Pruning:
    """Step 4: which nodes and edges the pruned view keeps (the circuit itself is not changed)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    infl = influence(circuit) if infl is None else infl
    is_target = torch.zeros(circuit.n_nodes, dtype=torch.bool)
    is_target[0] = True
    is_token = circuit.kind_mask(*TOKEN_KINDS)
    is_feature = circuit.kind_mask(*FEATURE_KINDS)
    nodes = (infl >= _top_fraction(infl[~is_target], node_threshold)) | is_target | is_token
    candidates = nodes[circuit.edge_src] & nodes[circuit.edge_dst]
    adj = adjacency(circuit, candidates)
    infl_kept = influence(circuit, adj)
    score = adj.norm * (infl_kept[adj.dst] + is_target[adj.dst])
    kept = score >= _top_fraction(score, edge_threshold)
    edges = torch.zeros(circuit.n_edges, dtype=torch.bool)
    edges[candidates.nonzero()[:, 0][kept]] = True
    while True:
        src, dst = circuit.edge_src[edges], circuit.edge_dst[edges]
        has_out = torch.zeros_like(nodes)
        has_out[src] = True
        has_in = torch.zeros_like(nodes)
        has_in[dst] = True
        new = nodes & (has_out | is_target) & (has_in | ~is_feature)
        edges = edges & new[circuit.edge_src] & new[circuit.edge_dst]
        if torch.equal(new, nodes):
            break
        nodes = new
    log.info("pruned by influence (%g, %g): %d -> %d nodes, %d -> %d edges", node_threshold, edge_threshold,
             circuit.n_nodes, int(nodes.sum()), circuit.n_edges, int(edges.sum()))
    return Pruning(nodes, edges, node_threshold, edge_threshold)


def score_and_prune(circuit: Circuit, prune_at: tuple[float, float] | None = DEFAULT_PRUNE) -> Circuit:
    """Graph influence on every node, the scores of the whole circuit and of its shown view, and the ``shown``
    masks of pruning at ``prune_at`` (``None``: every node and edge shown). Changes ``circuit`` in place and
    returns it. Score names: ``replacement``/``completeness`` for every kept node and edge,
    ``shown_replacement``/``shown_completeness`` for the shown view (hidden in-edges counted as remainder)."""
    adj = adjacency(circuit)
    infl = influence(circuit, adj)
    circuit.node_influence = infl.to(circuit.node_activation.dtype)
    scores = graph_scores(circuit, adj, infl)
    if prune_at is None:
        circuit.node_shown = torch.ones(circuit.n_nodes, dtype=torch.bool)
        circuit.edge_shown = torch.ones(circuit.n_edges, dtype=torch.bool)
        circuit.pruning = None
        shown = scores
    else:
        p = prune(circuit, *prune_at, infl=infl)
        circuit.node_shown, circuit.edge_shown = p.nodes, p.edges
        circuit.pruning = {"node_threshold": p.node_threshold, "edge_threshold": p.edge_threshold}
        shown = graph_scores(circuit.shown_view())
    circuit.scores = {**circuit.scores, **scores, "shown_replacement": shown["replacement"],
                      "shown_completeness": shown["completeness"]}
    return circuit
