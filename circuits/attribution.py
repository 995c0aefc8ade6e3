"""Hierarchical attribution and direct effects in the linearised model, with batched backward passes.

Algorithm (ATTRIBUTION.md sections 2, 3 and 5.1; Ge et al. 2024 for the hierarchical walk, Ameisen et al.
2025 for batching):

1. *Reading vectors.* Every reader (a target or a feature node) is an affine function of the residual stream
   it reads (``targets.read_targets``). One backward pass over a batch of B residual streams, reader b
   injected in row b, gives B reading vectors ``g_b = d h_b / d resid`` at once; the reader's value at a zero
   residual is its bias constant.
2. *Direct effects.* For a source node s written at an earlier stage, ``A[b, s] = a_s * d_s . g_b[pos_s]``:
   every other node is held fixed because the residual stream of the linearised model is nothing but the
   sum of node writes and constant writes. The constant is ``c_b = h_b(0) + sum over constant writes of
   (write . g_b)``, computed from the biases alone.
3. *Hierarchical attribution.* Walk the stages from the target down. At each stage, with ``G`` the target's
   reading vector plus ``(T_k / a_k) g_k`` for every node k kept so far, each node gets
   ``T_s = a_s * d_s . G[pos_s]``; nodes with ``|T_s| < threshold * |h_target|`` (a test on |T|, not signed)
   are dropped at once, so nothing upstream receives attribution through them; the kept features of the
   stage add their weighted reading vectors to ``G`` with one batched backward pass. This gives
   ``T_s = A[t, s] + sum over kept k downstream of (T_k / a_k) A[k, s]``.
4. *Edges.* The in-edges of the target and of every kept feature are rows of A restricted to kept sources,
   computed in batches of readers (``edge_rows``: one backward pass per batch, then one product per position
   with the kept nodes' writes there). The part of a row from dropped sources is the reader's *remainder*:
   the sum of those sources' own direct effects, taken as the reading vector dotted with the sum of their
   writes (``KeptSources.dropped``, by stage and position), which is the same sum by linearity and never forms
   a row over every active node. So the cost grows with the kept nodes, not with all of them. Edges into
   attention features are split by head with the closed-form per-head reading vectors (``_head_parts``); the
   parts sum to the edge.
5. *Exactness certificate.* For every reader, the clean value from the real model's cache must equal
   ``sum of kept in-edges + constant + remainder``. The largest relative residual (divided by
   ``max(|h|, sum |terms|)``) is stored; above 1e-4 (float32) or 1e-9 (float64) an ``ExactnessError`` is raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuits.linear_model import LinearisedModel
from circuits.targets import FeatureTarget, Target, read_targets, split_heads, value_read_directions

log = logging.getLogger(__name__)


class ExactnessError(RuntimeError):
    """An identity that must hold to rounding error does not: the computation is wrong somewhere."""


def tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


class NodeIndex:
    """A flat numbering of every node of a linearised model (group by group, position-major)."""

    def __init__(self, lm: LinearisedModel):
        self.lm = lm
        parts: dict[str, list[Tensor]] = {k: [] for k in ("group", "pos", "slot", "feature", "activation", "stage", "clean_pre")}
        self.flat: list[Tensor] = []  # per group: indices into its flattened [pos * m] layout
        table_flat: list[Tensor] = []  # per group: indices into the flattened [pos * slots] node table
        self.offsets: list[int] = []
        n = 0
        for i, g in enumerate(lm.groups):
            flat = g.mask.flatten().nonzero()[:, 0]
            self.flat.append(flat)
            self.offsets.append(n)
            n += len(flat)
            m = max(g.width, 1)
            table_flat.append((flat // m) * lm.table_direction.shape[1] + lm.table_offset[i] + flat % m)
            parts["group"].append(torch.full_like(flat, i))
            parts["pos"].append(flat // m)
            parts["slot"].append(flat % m)
            parts["feature"].append(g.feature.flatten()[flat])
            parts["activation"].append(g.activation.flatten()[flat])
            parts["stage"].append(torch.full_like(flat, g.stage))
            parts["clean_pre"].append(g.clean_pre.flatten()[flat])
        self.n = n
        self.table_flat: Int[Tensor, "n"] = torch.cat(table_flat) if table_flat else torch.zeros(0, dtype=torch.long)
        cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}
        self.group: Int[Tensor, "n"] = cat["group"]
        self.pos: Int[Tensor, "n"] = cat["pos"]
        self.slot: Int[Tensor, "n"] = cat["slot"]
        self.feature: Int[Tensor, "n"] = cat["feature"]
        self.activation: Float[Tensor, "n"] = cat["activation"]
        self.stage: Int[Tensor, "n"] = cat["stage"]
        self.clean_pre: Float[Tensor, "n"] = cat["clean_pre"]

    def columns(self, group: int) -> slice:
        return slice(self.offsets[group], self.offsets[group] + len(self.flat[group]))

    def kind(self, col: int) -> str:
        return self.lm.groups[int(self.group[col])].kind

    def layer(self, col: int) -> int:
        return self.lm.groups[int(self.group[col])].layer

    def unit_writes(self, cols: Int[Tensor, "k"]) -> Float[Tensor, "k d_model"]:
        """``d_s`` of the given nodes (residual-stream directions of one unit of activation)."""
        out = torch.zeros(len(cols), self.lm.cfg.d_model, dtype=self.lm.dtype, device=self.lm.device)
        for i, g in enumerate(self.lm.groups):
            sel = (self.group[cols] == i).nonzero()[:, 0]
            if len(sel):
                out[sel] = g.direction[self.pos[cols[sel]], self.slot[cols[sel]]]
        return out

    def feature_target(self, col: int) -> FeatureTarget:
        return FeatureTarget(self.kind(col), self.layer(col), int(self.feature[col]), int(self.pos[col]))


@dataclass
class ReadingVectors:
    """Row b: the gradient of reader b with respect to the residual stream it reads, and its constant."""

    g: Float[Tensor, "batch pos d_model"]
    constant: Float[Tensor, "batch"]
    stage: Int[Tensor, "batch"]


def reading_vectors(lm: LinearisedModel, targets: list[Target], autograd: bool = False) -> ReadingVectors:
    """One backward pass for all of ``targets`` (step 1 of the module docstring).

    Feature readers, the bulk of every batch, take the backward pass of ``targets.read_targets`` written out
    (``_feature_reading_vectors``: a centred, scaled encoder direction, through ``W_V`` and the frozen pattern
    for attention features); any other target, or every target with ``autograd=True``, goes through a real
    backward pass. Both give the same reading vectors (a test); the benchmark uses ``autograd`` as its naive
    baseline, one backward pass per target.
    """
    g = torch.zeros(len(targets), lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, device=lm.device)
    h0 = torch.zeros(len(targets), dtype=lm.dtype, device=lm.device)
    closed = (lambda t: False) if autograd else (lambda t: isinstance(t, FeatureTarget))
    features = [b for b, t in enumerate(targets) if closed(t)]
    others = [b for b, t in enumerate(targets) if not closed(t)]
    if features:
        with torch.no_grad():  # closed form: no graph, even where dictionary parameters require grad
            _feature_reading_vectors(lm, [targets[b] for b in features], features, g, h0)
    if others:
        resid = torch.zeros(len(others), lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, device=lm.device, requires_grad=True)
        with torch.enable_grad():
            h = read_targets(lm, [targets[b] for b in others], resid)
            (g_others,) = torch.autograd.grad(h.sum(), resid)
        rows = torch.tensor(others, device=lm.device)
        g[rows], h0[rows] = g_others, h.detach()
    stage = torch.tensor([t.stage(lm) for t in targets], device=lm.device)
    sees = torch.arange(lm.final_stage, device=lm.device)[None, :] < stage[:, None]  # [batch, stage]
    const_writes = einsum(g.sum(1), lm._const_writes, "b d, s d -> b s")
    return ReadingVectors(g, h0 + (const_writes * sees).sum(-1), stage)


def _feature_reading_vectors(lm: LinearisedModel, targets: list[FeatureTarget], rows: list[int],
                             g: Float[Tensor, "batch pos d_model"], h0: Float[Tensor, "batch"]) -> None:
    """Write the reading vectors and zero-residual values of feature readers into ``g[rows]`` and ``h0[rows]``.

    The gradient of ``read_targets`` in closed form: LayerNorm with a frozen scale is ``(r - mean r) / scale``,
    whose adjoint centres the reading direction and divides by the scale. A transcoder feature reads
    ``(w - mean w) / scale2[q]`` at its own position q; an attention feature reads
    ``sum_h pattern[h, q, k] (u_h - mean u_h) / scale1[k]`` at every key position k, ``u_h = W_V[h] w_h``.
    """
    by_dict: dict[tuple, list[int]] = {}
    for j, t in enumerate(targets):
        by_dict.setdefault((t.kind, t.layer, t.head), []).append(j)
    for (kind, layer, head), js in by_dict.items():
        dst = torch.tensor([rows[j] for j in js], device=lm.device)
        pos = torch.tensor([targets[j].pos for j in js], device=lm.device)
        feat = torch.tensor([targets[j].feature for j in js], device=lm.device)
        sae = lm.dictionary(kind, layer)
        w = sae.W_enc.index_select(1, feat).T  # a column gather; plain indexing is far slower
        bias = sae.b_enc[feat] if head is None else torch.zeros_like(sae.b_enc[feat])  # b_enc belongs to no head
        if kind == "mlp_feature":
            g[dst, pos] = (w - w.mean(-1, keepdim=True)) / lm.scale_ln2[layer][pos][:, None]
            h0[dst] = bias
            continue
        attn = lm.model.blocks[layer].attn
        w_h = split_heads(lm, w, head)
        u = value_read_directions(lm, layer, w_h)
        u = u - u.mean(-1, keepdim=True)
        pattern = rearrange(lm.patterns[layer][:, pos, :], "h r k -> r h k")
        g[dst] = einsum(pattern, u, "r h k, r h d -> r k d") / lm.scale_ln1[layer][None, :, None]
        h0[dst] = (pattern.sum(-1) * einsum(attn.b_V, w_h, "h e, r h e -> r h")).sum(-1) + bias


def direct_effects(lm: LinearisedModel, index: NodeIndex, rv: ReadingVectors) -> Float[Tensor, "batch n"]:
    """Row b of A: the direct effect of every node on reader b (zero for nodes it cannot see).

    One batched product over the whole node table (``LinearisedModel.table_dots``), then each row keeps the
    nodes of stages its reader sees.
    """
    limit = int(rv.stage.max())
    dots = lm.table_dots(rv.g, limit)  # [batch, pos, slots below limit]
    n_slots = dots.shape[2]
    dots = dots * (lm.table_stage[:n_slots][None, None, :] < rv.stage[:, None, None])
    total = lm.table_direction.shape[1]
    keep = index.stage < limit  # nodes in the computed prefix of the table
    out = torch.zeros(rv.g.shape[0], index.n, dtype=lm.dtype, device=lm.device)
    flat = index.table_flat[keep]
    pos, slot = flat // total, flat % total
    out[:, keep] = dots[:, pos, slot]
    return out


@dataclass
class KeptSources:
    """The kept nodes as edge sources, and the summed writes of the dropped ones (for remainders).

    ``writes`` holds ``a_s d_s`` of the kept nodes sorted by position (``segments``: (position, start, stop)
    of each position that has any), ``stage`` their stages in that order, ``unsort`` puts columns back in
    node-index order (that of ``cols``). ``dropped[t, p]`` is the sum of ``a_s d_s`` over the dropped nodes at
    position p of stages below t: a reader of stage t with reading vector g gets ``sum_p g[p] . dropped[t, p]``
    from them, which is the sum of their own direct effects (linearity of the dot product), without forming a
    row of A over every node.
    """

    cols: Int[Tensor, "k"]
    writes: Float[Tensor, "k d_model"]
    stage: Int[Tensor, "k"]
    unsort: Int[Tensor, "k"]
    segments: list[tuple[int, int, int]]
    dropped: Float[Tensor, "stages pos d_model"]


def kept_sources(lm: LinearisedModel, index: NodeIndex, kept: Bool[Tensor, "n"]) -> KeptSources:
    """Gather the kept nodes' writes by position, and sum the dropped nodes' writes by stage and position."""
    cols = kept.nonzero()[:, 0]
    order = torch.argsort(index.pos[cols], stable=True)
    sorted_cols = cols[order]
    writes = index.unit_writes(sorted_cols) * index.activation[sorted_cols][:, None]
    counts = torch.bincount(index.pos[cols], minlength=lm.n_pos).tolist()
    segments, start = [], 0
    for p, c in enumerate(counts):
        if c:
            segments.append((p, start, start + c))
        start += c
    # Dropped writes: each group's write with only its dropped nodes switched on, summed per stage.
    per_stage = torch.zeros(lm.final_stage + 1, lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, device=lm.device)
    for i, group in enumerate(lm.groups):
        drop = torch.zeros(group.mask.numel(), dtype=torch.bool, device=lm.device)
        drop[index.flat[i]] = ~kept[index.columns(i)]
        drop = drop.view_as(group.mask)
        if drop.any():
            act = torch.where(drop, group.activation, torch.zeros_like(group.activation))
            per_stage[group.stage + 1] += lm.write(group, act[None])[0]
    return KeptSources(cols, writes, index.stage[sorted_cols], torch.argsort(order), segments,
                       torch.cumsum(per_stage, 0))


@dataclass
class EdgeRows:
    """In-edges of a batch of readers from the kept nodes, and the summed direct effect of the dropped ones."""

    kept: Float[Tensor, "batch k"]  # A[b, s] for the kept sources s (columns as ``KeptSources.cols``)
    remainder: Float[Tensor, "batch"]
    constant: Float[Tensor, "batch"]


def edge_rows(lm: LinearisedModel, sources: KeptSources, readers: list[Target], autograd: bool = False) -> EdgeRows:
    """One backward pass for the readers, then their direct effects from the kept sources and the dropped sum.

    Costs one product ``[batch, d_model] x [d_model, kept at p]`` per position that has kept nodes and one dot
    per reader with the dropped writes, so it grows with the kept nodes, not with every active node.
    ``autograd`` as in ``reading_vectors``.
    """
    rv = reading_vectors(lm, readers, autograd=autograd)
    # Positions any reader of the batch may read (g is exactly 0 elsewhere): a transcoder feature reads its own
    # position, any other reader at most the positions up to its own (attention is causal).
    reach = max((t.max_pos for t in readers if not (isinstance(t, FeatureTarget) and t.kind == "mlp_feature")), default=-1)
    own = {t.pos for t in readers if isinstance(t, FeatureTarget) and t.kind == "mlp_feature"}
    read = [p <= reach or p in own for p in range(lm.n_pos)]
    kept = torch.zeros(len(readers), len(sources.cols), dtype=lm.dtype, device=lm.device)
    for p, start, stop in sources.segments:
        if read[p]:
            torch.mm(rv.g[:, p], sources.writes[start:stop].T, out=kept[:, start:stop])
    kept = torch.where(sources.stage[None, :] < rv.stage[:, None], kept, torch.zeros((), dtype=kept.dtype))
    kept = kept[:, sources.unsort]
    g_flat = rv.g.reshape(len(readers), -1)
    dropped = sources.dropped.reshape(sources.dropped.shape[0], -1)
    stages = rv.stage.unique().tolist()
    if len(stages) == 1:
        remainder = g_flat @ dropped[stages[0]]
    else:
        remainder = torch.empty(len(readers), dtype=lm.dtype, device=lm.device)
        for t in stages:
            rows = (rv.stage == t).nonzero()[:, 0]
            remainder[rows] = g_flat[rows] @ dropped[t]
    return EdgeRows(kept, remainder, rv.constant)


@dataclass
class Hierarchy:
    """The kept nodes of a hierarchical attribution and their total attributions ``T_s``."""

    kept: Bool[Tensor, "n"]
    influence: Float[Tensor, "n"]  # T_s, along paths through kept nodes only (0 for nodes never reached)
    target_value: float


def hierarchical_attribution(lm: LinearisedModel, index: NodeIndex, target: Target, threshold: float,
                             progress: bool = False) -> Hierarchy:
    """Step 3 of the module docstring: walk the stages down from the target, dropping small nodes at once."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (a fraction of |target|), got {threshold}")
    h = target.clean_value(lm)
    cut = threshold * abs(h)
    G = reading_vectors(lm, [target]).g
    kept = torch.zeros(index.n, dtype=torch.bool, device=lm.device)
    influence = torch.zeros(index.n, dtype=lm.dtype, device=lm.device)
    for stage in tqdm(range(target.stage(lm) - 1, -1, -1), desc="hierarchical attribution", disable=not progress, leave=False):
        G_stage = torch.zeros_like(G)
        for i, group in lm.groups_at(stage):
            if group.n_nodes == 0:
                continue
            T = (lm.unit_dots(group, G) * group.activation)[0]  # [pos, m]
            pos = torch.arange(lm.n_pos, device=lm.device)[:, None]
            keep = group.mask & (pos <= target.max_pos) & (T.abs() >= cut)
            cols = index.columns(i)
            influence[cols] = T.flatten()[index.flat[i]]
            kept[cols] = keep.flatten()[index.flat[i]]
            if group.is_feature and keep.any():
                # The kept features pass on (T_k / a_k) times their own reading vectors; dropped ones pass nothing.
                # One batched backward pass over the kept features of the group (closed form, as for edges).
                p_k, j_k = keep.nonzero(as_tuple=True)
                feats = group.feature[p_k, j_k].tolist()
                readers = [FeatureTarget(group.kind, group.layer, f, p) for f, p in zip(feats, p_k.tolist())]
                g = torch.zeros(len(readers), lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, device=lm.device)
                h0 = torch.zeros(len(readers), dtype=lm.dtype, device=lm.device)
                with torch.no_grad():
                    _feature_reading_vectors(lm, readers, list(range(len(readers))), g, h0)
                weight = T[p_k, j_k] / group.activation[p_k, j_k]
                G_stage = G_stage + einsum(weight, g, "k, k p d -> p d")[None]
        G = G + G_stage  # after the whole stage: nodes of one stage do not read each other
    return Hierarchy(kept, influence, h)


@dataclass
class Attribution:
    """Everything a circuit is made of, in node-index columns; ``readers[0]`` is the target."""

    index: NodeIndex
    target: Target
    hierarchy: Hierarchy
    threshold: float
    reader_cols: Int[Tensor, "r"]  # -1 for the target, else the node column of the kept feature
    reader_value: Float[Tensor, "r"]  # clean value (real model)
    reader_constant: Float[Tensor, "r"]
    reader_remainder: Float[Tensor, "r"]
    reader_residual: Float[Tensor, "r"]  # relative residual of each reader's completeness identity
    edge_src: Int[Tensor, "e"]  # node column
    edge_dst: Int[Tensor, "e"]  # reader index
    edge_weight: Float[Tensor, "e"]
    edge_heads: Float[Tensor, "e n_heads"] | None  # per-head parts (NaN where the reader is not an attention feature)
    max_relative_residual: float


def relative_residual(value: Tensor, terms_abs: Tensor, residual: Tensor) -> Tensor:
    """|residual| / max(|value|, sum of |terms|, tiny): the rounding error relative to the numbers summed."""
    scale = torch.maximum(value.abs(), terms_abs).clamp(min=torch.finfo(value.dtype).tiny)
    return residual.abs() / scale


def _head_parts(lm: LinearisedModel, index: NodeIndex, readers: list[Target], src: Tensor,
                dst: Tensor) -> Float[Tensor, "e n_heads"]:
    """Per-head parts of edges into attention features (NaN for other edges).

    The per-head reading vector of an attention feature is ``pattern[h, q, k] (u_h - mean u_h) / scale1[k]`` with
    ``u_h = W_V[h] w_h`` (``targets.value_read_directions``); each edge's part through head h is its source's
    write dotted with it. The parts sum to the edge, which comes from the reading vector of ``reading_vectors``.
    Per attention layer, one product of every reader's ``u`` with every source's write, then a gather at the
    edges (rather than one ``u`` per edge).
    """
    n_heads = lm.cfg.n_heads
    parts = torch.full((len(src), n_heads), float("nan"), dtype=lm.dtype, device=lm.device)
    layer_of = torch.tensor([r.layer if isinstance(r, FeatureTarget) and r.kind == "attn_feature" and r.head is None
                             else -1 for r in readers], dtype=torch.long, device=lm.device)
    edge_layer = layer_of[dst]
    for L in layer_of.unique().tolist():
        if L < 0:
            continue
        e = (edge_layer == L).nonzero()[:, 0]
        if len(e) == 0:
            continue
        rows, r_local = torch.unique(dst[e], return_inverse=True)
        cols, s_local = torch.unique(src[e], return_inverse=True)
        q = torch.tensor([readers[j].pos for j in rows.tolist()], device=lm.device)
        feat = torch.tensor([readers[j].feature for j in rows.tolist()], device=lm.device)
        sae = lm.dictionary("attn_feature", L)
        w_h = rearrange(sae.W_enc.index_select(1, feat), "(h e) r -> r h e", h=n_heads)
        u = value_read_directions(lm, L, w_h)
        u = u - u.mean(-1, keepdim=True)  # LayerNorm's centring, moved onto the reading side
        writes = index.unit_writes(cols) * index.activation[cols][:, None]  # a_s d_s, once per source
        dots = einsum(u, writes, "r h d, s d -> r s h")[r_local, s_local]  # [edges, heads]
        k = index.pos[src[e]]
        pattern = lm.patterns[L][:, q[r_local], k]  # [heads, edges]
        parts[e] = dots * rearrange(pattern, "h e -> e h") / lm.scale_ln1[L][k][:, None]
    return parts


def attribute(lm: LinearisedModel, target: Target, threshold: float = 0.01, batch_size: int = 64,
              progress: bool = True, check: bool = True) -> Attribution:
    """Hierarchical attribution of ``target`` then the direct-effect edges among the kept nodes.

    ``threshold`` is a fraction of |target|; 0 keeps every active node that precedes the target.
    """
    with torch.no_grad():  # gradients are taken explicitly, only with respect to residual streams
        return _attribute(lm, target, threshold, batch_size, progress, check)


def _attribute(lm: LinearisedModel, target: Target, threshold: float, batch_size: int, progress: bool,
               check: bool) -> Attribution:
    index = NodeIndex(lm)
    hier = hierarchical_attribution(lm, index, target, threshold, progress)
    kept_features = [int(c) for c in hier.kept.nonzero()[:, 0] if lm.groups[int(index.group[c])].is_feature]
    readers: list[Target] = [target] + [index.feature_target(c) for c in kept_features]
    reader_cols = torch.tensor([-1] + kept_features, dtype=torch.long, device=lm.device)
    n_r = len(readers)
    value = torch.empty(n_r, dtype=lm.dtype, device=lm.device)
    constant, remainder, residual = torch.empty_like(value), torch.empty_like(value), torch.empty_like(value)
    sources = kept_sources(lm, index, hier.kept)
    src, dst, weight = [], [], []
    bar = tqdm(total=n_r, desc="edges", disable=not progress, leave=False)
    for start in range(0, n_r, batch_size):
        chunk = readers[start : start + batch_size]
        e = edge_rows(lm, sources, chunk)
        rows = torch.arange(start, start + len(chunk), device=lm.device)
        v = index.clean_pre[reader_cols[rows].clamp(min=0)]
        if start == 0:
            v = v.clone()
            v[0] = hier.target_value
        kept_sum = e.kept.sum(-1)
        value[rows], constant[rows], remainder[rows] = v, e.constant, e.remainder
        terms_abs = e.kept.abs().sum(-1) + e.remainder.abs() + e.constant.abs()
        residual[rows] = relative_residual(v, terms_abs, v - (kept_sum + e.constant + e.remainder))
        b, s = e.kept.nonzero(as_tuple=True)
        src.append(sources.cols[s])
        dst.append(rows[b])
        weight.append(e.kept[b, s])
        bar.update(len(chunk))
    bar.close()
    src_t, dst_t, w_t = torch.cat(src), torch.cat(dst), torch.cat(weight)
    heads = _head_parts(lm, index, readers, src_t, dst_t)
    max_res = float(residual.max()) if n_r else 0.0
    result = Attribution(index, target, hier, threshold, reader_cols, value, constant, remainder, residual,
                         src_t, dst_t, w_t, heads, max_res)
    log.info("attribution of %s: %d kept nodes, %d edges, max relative residual %.3g",
             getattr(target, "spec", target), int(hier.kept.sum()), len(w_t), max_res)
    if check:
        check_exact(result, lm.dtype)
    return result


def check_exact(result: Attribution, dtype: torch.dtype) -> None:
    """Raise ``ExactnessError`` if any reader's completeness identity fails beyond the dtype's tolerance."""
    tol = tolerance(dtype)
    if not result.max_relative_residual <= tol:  # also catches NaN
        worst = int(result.reader_residual.argmax())
        raise ExactnessError(
            f"completeness fails: reader {worst} has relative residual {result.max_relative_residual:.3g} > {tol:g} "
            f"(value {float(result.reader_value[worst]):.6g}, constant {float(result.reader_constant[worst]):.6g}, "
            f"remainder {float(result.reader_remainder[worst]):.6g})"
        )
