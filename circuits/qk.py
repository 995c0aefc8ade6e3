"""QK: the exact decomposition of a pre-softmax attention score into (query-side, key-side) node pairs.

Algorithm (docs/attribution.md section 6; Ge et al. 2024):

1. With LayerNorm scales frozen, ``x_q = LN1(resid)[q]`` is a sum over the nodes written at position q before
   the attention layer, plus one constant entry (the bias writes of earlier stages); likewise ``x_k``.
2. Map each entry through the head's ``W_Q`` (query side) or ``W_K`` (key side); the constant entries also
   take ``b_Q`` or ``b_K`` (where ``fold_ln`` put the LayerNorm betas). Position embeddings are nodes.
   Where attention layers below pass through, a node at an earlier position reaches ``x_q`` through them too: each
   side's entries are then the node's direct effects on the ``d_head`` components of ``x_q W_Q`` (one descent of
   ``d_head`` reading vectors, ``LinearisedModel.descend``), over every node at a position up to q.
3. ``T_ij = u_i . v_j / sqrt(d_head)``. Then ``sum_ij T_ij = S`` exactly; the row sums are the query-side
   contributions and the column sums the key-side contributions, each of which also sums to S.
   (Gradient-times-input through both sides at once would sum to 2S; the graph's in-edges of an attention-score
   target are the half-sum of the two marginals, see ``targets.AttentionScoreTarget``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from circuits.attribution import NodeIndex, relative_residual
from circuits.linear_model import LinearisedModel
from circuits.targets import AttentionScoreTarget


@dataclass
class QKDecomposition:
    """``pairs[i, j]``: query-side entry i with key-side entry j; the last row and column are the constants."""

    target: AttentionScoreTarget
    query_cols: Int[Tensor, "nq"]  # node columns (NodeIndex) of the query-side entries
    key_cols: Int[Tensor, "nk"]
    pairs: Float[Tensor, "nq_plus_1 nk_plus_1"]
    score: float  # the clean score, from the real model
    relative_residual: float

    @property
    def query_marginal(self) -> Float[Tensor, "nq_plus_1"]:
        return self.pairs.sum(1)

    @property
    def key_marginal(self) -> Float[Tensor, "nk_plus_1"]:
        return self.pairs.sum(0)


def qk_decomposition(lm: LinearisedModel, index: NodeIndex, target: AttentionScoreTarget) -> QKDecomposition:
    """The pair matrix of ``target`` over every node at its query and key positions (steps 1-3 above)."""
    attn = lm.model.blocks[target.layer].attn
    stage = target.stage(lm)
    with torch.no_grad():
        sides = []
        for pos, W, b in ((target.query_pos, attn.W_Q[target.head], attn.b_Q[target.head]),
                          (target.key_pos, attn.W_K[target.head], attn.b_K[target.head])):
            if any(t < stage for t in [*lm.linear_stages, *lm.extra_at]):
                sides.append(_side_through_pass_through(lm, index, target.layer, pos, W, b, stage))
                continue
            cols = ((index.pos == pos) & (index.stage < stage)).nonzero()[:, 0]
            entries = torch.cat([index.unit_writes(cols) * index.activation[cols][:, None],
                                 lm._const_writes[:stage].sum(0, keepdim=True)])
            # LayerNorm with the frozen scale is linear, so it maps each entry on its own.
            x = (entries - entries.mean(-1, keepdim=True)) / lm.scale_ln1[target.layer, pos]
            mapped = x @ W
            mapped[-1] += b  # the bias belongs to the constant entry
            sides.append((cols, mapped))
        (q_cols, U), (k_cols, V) = sides
        pairs = U @ V.T / lm.cfg.attn_scale
        score = target.clean_value(lm)
        total = pairs.sum()
        res = relative_residual(torch.tensor(score, dtype=lm.dtype), pairs.abs().sum(), torch.tensor(score, dtype=lm.dtype) - total)
    return QKDecomposition(target, q_cols, k_cols, pairs, score, float(res))


def _side_through_pass_through(lm: LinearisedModel, index: NodeIndex, layer: int, pos: int,
                               W: Float[Tensor, "d_model d_head"], b: Float[Tensor, "d_head"], stage: int):
    """One side's entries where attention below passes through: the direct effects of every node at a position up
    to ``pos`` on the ``d_head`` components of ``LN1(resid)[pos] @ W``, and the constant entry last."""
    d_head = W.shape[1]
    g = torch.zeros(d_head, lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, device=lm.device)
    g[:, pos] = (W.T - W.T.mean(-1, keepdim=True)) / lm.scale_ln1[layer, pos]  # LayerNorm's adjoint on each column
    effects = torch.zeros(index.n, d_head, dtype=lm.dtype, device=lm.device)
    constant = b.clone()
    for t, G in lm.descend(g, torch.full((d_head,), stage, device=lm.device)):
        constant += G.sum(1) @ lm.constant_write(t)
        for i, group in lm.groups_at(t):
            if group.n_nodes:
                dots = lm.unit_dots(group, G) * group.activation  # [d_head, pos, m]
                effects[index.columns(i)] += dots.flatten(1)[:, index.flat[i]].T
        for i, dirs in lm.extra_at.get(t, []):  # a cross-layer transcoder's writes into later layers
            dots = einsum(G, dirs, "b p d, p m d -> b p m") * lm.groups[i].activation
            effects[index.columns(i)] += dots.flatten(1)[:, index.flat[i]].T
    cols = ((index.pos <= pos) & (index.stage < stage)).nonzero()[:, 0]
    return cols, torch.cat([effects[cols], constant[None]])
