"""Influence on the target, the replacement and completeness scores, and pruning by influence.

Algorithm (Ameisen et al. 2025, "Circuit Tracing", graph scores and pruning):

1. Build the adjacency ``A[dst, src]`` of the circuit from its edges. Normalise by row:
   ``N[dst, :] = |A[dst, :]| / (sum |A[dst, :]| + |remainder_dst|)`` - the remainder (the part from pruned
   sources) counts as unexplained mass, like an error node. With ``--threshold 0`` it is zero and these are
   exactly the paper's definitions.
2. Influence: ``I = e_target (N + N^2 + N^3 + ...)``. ``A`` is strictly lower-triangular in the order of the
   forward pass (nilpotent), so the series ends after at most as many terms as there are stages.
3. Replacement score: influence reaching token and position embeddings over influence reaching embeddings,
   error nodes and remainders. Completeness score: the influence-weighted share of each node's input that
   comes from non-error nodes.
4. Pruning: keep the features with the largest influence until ``node_threshold`` of the total feature
   influence is covered (embeddings, errors and the target always stay), then the edges with the largest
   ``influence(dst) * N[dst, src]`` until ``edge_threshold`` of the total is covered. Every dropped edge's
   weight (a dropped node takes its out-edges with it) moves into its target's remainder, so each node still
   satisfies ``activation = in-edges + constant + remainder``.
"""

from __future__ import annotations

import logging

import torch

from circuits.graph import TARGET_ID, Circuit

log = logging.getLogger(__name__)

ERROR_KINDS = ("attn_error", "mlp_error", "mlp_output")  # a frozen MLP output (no transcoder) is unexplained too
TOKEN_KINDS = ("embed", "pos_embed")


def _matrices(circuit: Circuit):
    ids = [n["id"] for n in circuit.nodes]
    where = {nid: i for i, nid in enumerate(ids)}
    n = len(ids)
    A = torch.zeros(n, n, dtype=torch.float64)
    for e in circuit.edges:
        A[where[e["target"]], where[e["source"]]] += e["weight"]
    remainder = torch.tensor([abs(x["remainder"]) for x in circuit.nodes], dtype=torch.float64)
    denom = A.abs().sum(1) + remainder
    N = A.abs() / denom.clamp(min=1e-300)[:, None]
    lost = remainder / denom.clamp(min=1e-300)
    return ids, where, A, N, lost


def node_influence(circuit: Circuit) -> dict[str, float]:
    """Step 2: the influence of every node on the target (the target itself gets 0)."""
    ids, where, _, N, _ = _matrices(circuit)
    x = torch.zeros(len(ids), dtype=torch.float64)
    x[where[TARGET_ID]] = 1.0
    total = torch.zeros_like(x)
    for _ in range(len(ids) + 1):
        x = x @ N
        if not x.any():
            break
        total += x
    return dict(zip(ids, total.tolist()))


def graph_scores(circuit: Circuit) -> dict[str, float]:
    """Step 3: ``replacement`` and ``completeness`` scores, both in [0, 1]."""
    ids, where, _, N, lost = _matrices(circuit)
    influence = node_influence(circuit)
    infl = torch.tensor([influence[i] for i in ids], dtype=torch.float64)
    kinds = [n["kind"] for n in circuit.nodes]
    is_err = torch.tensor([k in ERROR_KINDS for k in kinds])
    is_tok = torch.tensor([k in TOKEN_KINDS for k in kinds])
    weight = infl.clone()
    weight[where[TARGET_ID]] = 1.0
    token = float(infl[is_tok].sum())
    error = float(infl[is_err].sum()) + float((weight * lost).sum())
    non_error = 1 - N[:, is_err].sum(1) - lost
    has_inputs = N.sum(1) + lost > 0
    completeness = float((non_error * weight)[has_inputs].sum() / weight[has_inputs].sum().clamp(min=1e-300))
    replacement = token / (token + error) if token + error > 0 else float("nan")
    return {"replacement": replacement, "completeness": completeness}


def prune_by_influence(circuit: Circuit, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Circuit:
    """Step 4: a smaller circuit whose nodes still satisfy their completeness identity exactly."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    ids, where, A, N, _ = _matrices(circuit)
    infl = node_influence(circuit)
    features = sorted((i for i, n in enumerate(circuit.nodes) if n["kind"] in ("attn_feature", "mlp_feature")),
                      key=lambda i: -infl[ids[i]])
    total = sum(infl[ids[i]] for i in features)
    keep = {i for i, n in enumerate(circuit.nodes) if n["kind"] not in ("attn_feature", "mlp_feature")}
    running = 0.0
    for i in features:
        if total > 0 and running >= node_threshold * total:
            break
        keep.add(i)
        running += infl[ids[i]]
    weight_dst = torch.tensor([infl[i] for i in ids], dtype=torch.float64)
    weight_dst[where[TARGET_ID]] = 1.0
    candidates = [e for e in circuit.edges if where[e["source"]] in keep and where[e["target"]] in keep]
    score = [float(weight_dst[where[e["target"]]] * N[where[e["target"]], where[e["source"]]]) for e in candidates]
    order = sorted(range(len(candidates)), key=lambda j: -score[j])
    total_e, running, kept_edges = sum(score), 0.0, set()
    for j in order:
        if total_e > 0 and running >= edge_threshold * total_e:
            break
        kept_edges.add(j)
        running += score[j]
    edges = [candidates[j] for j in sorted(kept_edges)]
    kept_keys = {(e["source"], e["target"]) for e in edges}
    moved: dict[str, float] = {}
    for e in circuit.edges:
        if (e["source"], e["target"]) not in kept_keys and where[e["target"]] in keep:
            moved[e["target"]] = moved.get(e["target"], 0.0) + e["weight"]
    nodes = []
    for i, n in enumerate(circuit.nodes):
        if i in keep:
            nodes.append({**n, "remainder": n["remainder"] + moved.get(n["id"], 0.0)})
    log.info("pruned by influence: %d -> %d nodes, %d -> %d edges", len(circuit.nodes), len(nodes), len(circuit.edges), len(edges))
    return circuit.copy_with(nodes=nodes, edges=edges)
