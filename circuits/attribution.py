"""Hierarchical attribution and direct effects in the linearised model, with batched backward passes.

Algorithm (docs/attribution.md sections 2 to 5; Ge et al. 2024 for the hierarchical walk, Ameisen et al.
2025 for batching):

1. *Reading vectors.* Every reader (a target or a feature node) is an affine function of the residual stream
   it reads (``targets.read_targets``). One backward pass over a batch of B residual streams, reader b
   injected in row b, gives B reading vectors ``g_b = d h_b / d resid`` at once; the reader's value at a zero
   residual is its bias constant. Feature readers take that backward pass in closed form, one batched product
   per dictionary; a transcoder feature's reading vector is kept at its one position only
   (``CompactReadingVectors``), so a batch never stores or reads the zeros at the other positions.
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
   read with the kept nodes' writes there, restricted to the stages the readers see). The part of a row from dropped sources is the reader's *remainder*:
   the sum of those sources' own direct effects, taken as the reading vector dotted with the sum of their
   writes (``KeptSources.dropped``, by stage and position), which is the same sum by linearity and never forms
   a row over every active node. So the cost grows with the kept nodes, not with all of them. Edges into
   attention features are split by head with the closed-form per-head reading vectors (``_head_parts``); the
   parts sum to the edge.
5. *Pass-through layers.* Where an attention layer has no SAE (or a transcoder has a skip path), what a reader
   reads below that stage also passes through it, so its reading vector differs from stage to stage; a cross-
   layer transcoder's feature writes at several stages. Then every batch *descends* the stages
   (``LinearisedModel.descend``): at stage t the readers' vectors of that stage meet the kept sources written
   at t (one batched product over positions), the stage's constant write (into the constants) and its dropped
   writes (into the remainders); a pass-through stage then adds its transpose to the vectors. The hierarchical
   walk of step 3 carries its ``G`` down the same way. Edges into attention features are split by head with
   head-restricted readers on the same descent.
6. *Exactness certificate.* For every reader, the clean value from the real model's cache must equal
   ``sum of kept in-edges + constant + remainder``. The largest relative residual (divided by
   ``max(|h|, sum |terms|)``) is stored; above 1e-4 (float32) or 1e-9 (float64) an ``ExactnessError`` is raised.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuits.linear_model import LinearisedModel, attn_stage
from circuits.targets import FeatureTarget, Target, read_targets, split_heads

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


@dataclass
class CompactReadingVectors:
    """The reading vectors of a batch, stored by how far each reader reads (``dense()`` gives ``ReadingVectors.g``).

    A transcoder-feature reader reads its own position only: ``local[i]`` is its reading vector there, for batch
    row ``local_rows[i]`` at position ``local_pos[i]`` (sorted by position). Every other reader may read any
    position up to its own: ``spread[j]`` is its reading vector at every position, for batch row
    ``spread_rows[j]`` (sorted by stage; ``read`` lists the positions where any of them may be non-zero: up to
    its own position, or only that one for a transcoder feature read by autograd). Stored densely, the
    local readers would make most of a batch zeros, and every later product would read those zeros.
    """

    local: Float[Tensor, "r_local d_model"]
    local_rows: list[int]
    local_pos: list[int]
    spread: Float[Tensor, "r_spread pos d_model"]
    spread_rows: list[int]
    read: list[int]
    constant: Float[Tensor, "batch"]
    stage: Int[Tensor, "batch"]
    stages: list[int]  # the same as ``stage``, as Python ints
    h0: Float[Tensor, "batch"]  # the reader's value at a zero residual (its own biases)

    def dense(self) -> Float[Tensor, "batch pos d_model"]:
        g = self.local.new_zeros(len(self.stages), self.spread.shape[1], self.local.shape[1])
        if self.spread_rows:
            g[self.spread_rows] = self.spread
        if self.local_rows:
            g[self.local_rows, self.local_pos] = self.local
        return g

    def weighted_sum(self, weight: Float[Tensor, "batch"]) -> Float[Tensor, "pos d_model"]:
        """``sum_b weight[b] g_b``: what a set of readers passes on in the hierarchical walk."""
        out = self.local.new_zeros(self.spread.shape[1], self.local.shape[1])
        if self.local_rows:
            pos = torch.tensor(self.local_pos, device=out.device)
            out.index_add_(0, pos, self.local * weight[self.local_rows][:, None])
        if self.spread_rows:
            out += einsum(weight[self.spread_rows], self.spread, "r, r p d -> p d")
        return out


def reading_vectors(lm: LinearisedModel, targets: list[Target], autograd: bool = False) -> ReadingVectors:
    """One backward pass for all of ``targets`` (step 1 of the module docstring), as dense ``[batch, pos, d_model]``.

    ``g`` is each reader's reading vector on the residual stream just below its own stage; where attention
    layers pass through, the vectors of lower stages follow from it by ``LinearisedModel.descend``.
    """
    rv = compact_reading_vectors(lm, targets, autograd)
    return ReadingVectors(rv.dense(), rv.constant, rv.stage)


def compact_reading_vectors(lm: LinearisedModel, targets: list[Target], autograd: bool = False,
                            constants: bool = True) -> CompactReadingVectors:
    """One backward pass for all of ``targets``, stored compactly (``CompactReadingVectors``).

    Feature readers, the bulk of every batch, take the backward pass of ``targets.read_targets`` written out
    (a centred, scaled encoder direction; through ``W_V`` and the frozen pattern for attention features), one
    dictionary at a time; any other target, or every target with ``autograd=True``, goes through a real backward
    pass. Both give the same reading vectors (a test); the benchmark uses ``autograd`` as its naive baseline, one
    backward pass per target. The constant of reader b is its value at a zero residual plus its reading vector
    dotted with the constant writes of the stages it sees; where attention layers pass through, the reading
    vector of each stage below them (``LinearisedModel.descend``), which takes a descent of its own unless
    ``constants=False`` (the caller then computes the constants on its own descent from ``h0``).
    """
    n, d, n_pos = len(targets), lm.cfg.d_model, lm.n_pos
    opts = dict(dtype=lm.dtype, device=lm.device)
    stages = [t.stage(lm) for t in targets]
    closed = [not autograd and isinstance(t, FeatureTarget) for t in targets]
    is_local = [c and t.kind == "mlp_feature" for c, t in zip(closed, targets)]
    local_rows = sorted((b for b in range(n) if is_local[b]), key=lambda b: targets[b].pos)
    # Spread readers sorted by stage, each dictionary's closed-form readers (and head) one contiguous block.
    head_key = lambda t: -1 if t.head is None else t.head
    spread_rows = sorted((b for b in range(n) if not is_local[b]),
                         key=lambda b: (stages[b], 0, head_key(targets[b]), b) if closed[b] else (stages[b], 1, 0, b))
    local = torch.empty(len(local_rows), d, **opts)
    spread = torch.empty(len(spread_rows), n_pos, d, **opts)
    h0 = torch.zeros(n, **opts)  # the reader's value at a zero residual
    # The reading vector summed over positions, dotted with the constant writes of the stages the reader sees.
    below = torch.cat([torch.zeros(1, d, **opts), torch.cumsum(lm._const_writes, 0)])  # constant writes below each stage
    const_dot = torch.zeros(n, **opts)
    with torch.no_grad():  # closed form: no graph, even where dictionary parameters require grad
        by_dict: dict[tuple, list[int]] = defaultdict(list)
        for i, b in enumerate(local_rows):
            by_dict[targets[b].layer, targets[b].head].append(i)
        for (layer, head), idx in by_dict.items():
            rows = [local_rows[i] for i in idx]
            feat = torch.tensor([targets[b].feature for b in rows], device=lm.device)
            local[idx] = lm.encoder_rows("mlp_feature", layer, feat)
            h0[rows] = lm.dictionary("mlp_feature", layer).b_enc[feat] if head is None else 0.0  # b_enc belongs to no head
        if local_rows:
            # LayerNorm with a frozen scale is (r - mean r) / scale: its adjoint centres and divides.
            layer = torch.tensor([targets[b].layer for b in local_rows], device=lm.device)
            pos = torch.tensor([targets[b].pos for b in local_rows], device=lm.device)
            local.sub_(local.mean(-1, keepdim=True)).div_(lm.scale_ln2[layer, pos][:, None])
        for key, run in _runs(spread_rows, lambda b: (stages[b], head_key(targets[b])) if closed[b] else None):
            if key is None:
                continue
            rows = [spread_rows[j] for j in run]
            a, b = run[0], run[-1] + 1
            layer, head = targets[rows[0]].layer, targets[rows[0]].head
            q = torch.tensor([targets[r].pos for r in rows], device=lm.device)
            feat = torch.tensor([targets[r].feature for r in rows], device=lm.device)
            sae = lm.dictionary("attn_feature", layer)
            # the encoder columns split by head, head-major: [head, reader, d_head] (other heads zeroed for a head)
            w_h = lm.encoder_rows("attn_feature", layer, feat).view(len(rows), lm.cfg.n_heads, -1).transpose(0, 1)
            w_h = w_h.contiguous() if head is None else w_h * (torch.arange(lm.cfg.n_heads, device=lm.device) == head)[:, None, None]
            # u_h = W_V[h] w_h with LayerNorm's centring moved onto the reading side (``value_reader``)
            u = torch.bmm(w_h, lm.value_reader(layer))  # [head, reader, d_model]
            pattern = lm.patterns[layer][:, q, :]  # [head, reader, key]
            scaled = pattern / lm.scale_ln1[layer]
            # g[k] = sum_h pattern[h, q, k] u_h / scale1[k]: one batched product per dictionary
            torch.bmm(scaled.permute(1, 2, 0), u.transpose(0, 1), out=spread[a:b])
            # Per head, w_h . b_V[h] is the value bias read at every key (weighted by the pattern), and
            # u_h . below = w_h . (value_reader[h] below) the constant writes read at every key (they are the same
            # at every position; weighted by pattern / scale1): both in d_head, without forming g summed over keys.
            dots = torch.bmm(w_h, lm.value_biases(layer).permute(1, 2, 0))  # [head, reader, 2]
            h0[rows] = (pattern.sum(-1) * dots[..., 0]).sum(0) + (sae.b_enc[feat] if head is None else 0.0)
            const_dot[rows] = (scaled.sum(-1) * dots[..., 1]).sum(0)
    others = [j for j, b in enumerate(spread_rows) if not closed[b]]
    if others:
        rows = [spread_rows[j] for j in others]
        resid = torch.zeros(len(rows), n_pos, d, **opts, requires_grad=True)
        with torch.enable_grad():
            h = read_targets(lm, [targets[b] for b in rows], resid)
            (g,) = torch.autograd.grad(h.sum(), resid)
        spread[others] = g
        h0[rows] = h.detach()
        const_dot[rows] = (g.sum(1) * below[[stages[b] for b in rows]]).sum(-1)
    stage = torch.tensor(stages, device=lm.device)
    if local_rows:
        const_dot[local_rows] = (local @ below.T).gather(1, stage[local_rows][:, None])[:, 0]
    constant = h0 + const_dot
    # A transcoder feature reads its own position (even when its reading vector comes from autograd); any other
    # reader at most the positions up to its own (attention is causal).
    reads_one = lambda t: isinstance(t, FeatureTarget) and t.kind == "mlp_feature"
    own = {targets[b].pos for b in spread_rows if reads_one(targets[b])}
    reach = max((targets[b].max_pos for b in spread_rows if not reads_one(targets[b])), default=-1)
    read = [p for p in range(n_pos) if p <= reach or p in own]
    rv = CompactReadingVectors(local, local_rows, [targets[b].pos for b in local_rows], spread, spread_rows, read,
                               constant, stage, stages, h0)
    if lm.needs_descent:
        rv.constant = h0.clone()
        if constants:
            for t, G in lm.descend(rv.dense(), stage):
                rv.constant += G.sum(1) @ lm.constant_write(t)
    return rv


def _runs(items: list, key) -> list[tuple[object, list[int]]]:
    """Maximal runs of consecutive items with the same key: (key, indices into ``items``)."""
    runs: list[tuple[object, list[int]]] = []
    for i, item in enumerate(items):
        k = key(item)
        if runs and runs[-1][0] == k:
            runs[-1][1].append(i)
        else:
            runs.append((k, [i]))
    return runs


def direct_effects(lm: LinearisedModel, index: NodeIndex, rv: ReadingVectors) -> Float[Tensor, "batch n"]:
    """Row b of A: the direct effect of every node on reader b (zero for nodes it cannot see).

    One batched product over the whole node table (``LinearisedModel.table_dots``), then each row keeps the
    nodes of stages its reader sees.
    """
    limit = int(rv.stage.max())
    if lm.needs_descent:
        return _direct_effects_descending(lm, index, rv)
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


def _direct_effects_descending(lm: LinearisedModel, index: NodeIndex, rv: ReadingVectors) -> Float[Tensor, "batch n"]:
    """``direct_effects`` where attention passes through: each stage's nodes read with that stage's vectors."""
    out = torch.zeros(rv.g.shape[0], index.n, dtype=lm.dtype, device=lm.device)
    for t, G in lm.descend(rv.g, rv.stage):
        for i, group in lm.groups_at(t):
            if group.n_nodes:
                dots = lm.unit_dots(group, G) * group.activation  # [batch, pos, m]
                out[:, index.columns(i)] += dots.flatten(1)[:, index.flat[i]]
        for i, dirs in lm.extra_at.get(t, []):  # a cross-layer transcoder's writes into later layers
            dots = einsum(G, dirs, "b p d, p m d -> b p m") * lm.groups[i].activation
            out[:, index.columns(i)] += dots.flatten(1)[:, index.flat[i]]
    return out


@dataclass
class KeptSources:
    """The kept nodes as edge sources, and the summed writes of the dropped ones (for remainders).

    ``writes`` holds ``a_s d_s`` of the kept nodes sorted by position, and within a position by stage; ``pos`` and
    ``stage`` are theirs in that order, ``unsort`` puts columns back in node-index order (that of ``cols``).
    The kept nodes at position p are rows ``starts[p]`` to ``starts[p + 1]``, of which the first ``below[p][t]``
    have a stage below t. ``dropped[t, p]`` is the sum of ``a_s d_s`` over the dropped nodes at position p of
    stages below t: a reader of stage t with reading vector g gets ``sum_p g[p] . dropped[t, p]`` from them, which
    is the sum of their own direct effects (linearity of the dot product), without forming a row of A over
    every node.
    """

    cols: Int[Tensor, "k"]
    writes: Float[Tensor, "k d_model"]
    pos: Int[Tensor, "k"]
    stage: Int[Tensor, "k"]
    unsort: Int[Tensor, "k"]
    starts: list[int]
    below: list[list[int]]
    dropped: Float[Tensor, "stages pos d_model"]
    dropped_at: Float[Tensor, "stages pos d_model"]  # ``dropped_at[t + 1]``: the dropped writes of stage t alone
    extra: list[tuple[int, Tensor, Tensor]] | None = None  # (stage, rows into ``writes``, their writes there)
    by_stage: dict | None = None  # made by ``stage_layout`` when first needed

    def stage_layout(self, n_pos: int) -> dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per stage with kept sources: their writes padded by position ``[pos, m, d_model]``, and for each source
        its position, its slot there and its row in ``writes``, so that one batched product per stage meets them
        with the reading vectors of that stage at every position. A cross-layer transcoder's feature is in the
        layout of each stage it writes (``extra``)."""
        if self.by_stage is None:
            self.by_stage = {}
            parts: dict[int, list[tuple[Tensor, Tensor]]] = {}
            for t in self.stage.unique().tolist():
                rows = (self.stage == t).nonzero()[:, 0]
                parts.setdefault(t, []).append((rows, self.writes[rows]))
            for t, rows, w in self.extra or []:
                parts.setdefault(t, []).append((rows, w))
            for t, chunks in parts.items():
                rows = torch.cat([r for r, _ in chunks])
                w = torch.cat([x for _, x in chunks])
                order = torch.argsort(self.pos[rows], stable=True)
                rows, w = rows[order], w[order]
                pos = self.pos[rows]
                counts = torch.bincount(pos, minlength=n_pos)
                first = torch.cumsum(counts, 0) - counts
                slot = torch.arange(len(rows), device=rows.device) - first[pos]
                padded = self.writes.new_zeros(n_pos, int(counts.max()), self.writes.shape[1])
                padded[pos, slot] = w
                self.by_stage[t] = (padded, pos, slot, rows)
        return self.by_stage


def kept_sources(lm: LinearisedModel, index: NodeIndex, kept: Bool[Tensor, "n"]) -> KeptSources:
    """Gather the kept nodes' writes by position, and sum the dropped nodes' writes by stage and position."""
    cols = kept.nonzero()[:, 0]
    # Node-index order is stage order (groups are built in stage order), so a stable sort keeps it per position.
    order = torch.argsort(index.pos[cols], stable=True)
    sorted_cols = cols[order]
    writes = index.unit_writes(sorted_cols) * index.activation[sorted_cols][:, None]
    pos, stage = index.pos[sorted_cols], index.stage[sorted_cols]
    counts = torch.zeros(lm.n_pos, lm.final_stage + 1, dtype=torch.long, device=lm.device)
    counts.index_put_((pos, stage), torch.ones_like(pos), accumulate=True)
    below = torch.cat([torch.zeros_like(counts[:, :1]), counts.cumsum(1)], 1)  # [pos, t]: kept at p of stage < t
    starts = [0] + below[:, -1].cumsum(0).tolist()
    # Dropped writes: each group's write with only its dropped nodes switched on, summed per stage.
    per_stage = torch.zeros(lm.final_stage + 1, lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, device=lm.device)
    for i, group in enumerate(lm.groups):
        drop = torch.zeros(group.mask.numel(), dtype=torch.bool, device=lm.device)
        drop[index.flat[i]] = ~kept[index.columns(i)]
        drop = drop.view_as(group.mask)
        if drop.any():
            act = torch.where(drop, group.activation, torch.zeros_like(group.activation))
            per_stage[group.stage + 1] += lm.write(group, act[None])[0]
    # A cross-layer transcoder's writes into later layers: the kept features' rows there, the dropped ones' sum.
    extra = []
    where = torch.full((index.n,), -1, dtype=torch.long, device=lm.device)
    where[sorted_cols] = torch.arange(len(sorted_cols), device=lm.device)
    for i, t, dirs in lm.extra_writes:
        group, cols_i = lm.groups[i], index.columns(i)
        kept_i = kept[cols_i].nonzero()[:, 0]
        node = kept_i + cols_i.start
        if len(node):
            w = dirs[index.pos[node], index.slot[node]] * index.activation[node][:, None]
            extra.append((t, where[node], w))
        drop = torch.zeros(group.mask.numel(), dtype=torch.bool, device=lm.device)
        drop[index.flat[i]] = ~kept[cols_i]
        drop = drop.view_as(group.mask)
        if drop.any():
            act = torch.where(drop, group.activation, torch.zeros_like(group.activation))
            per_stage[t + 1] += einsum(act, dirs, "p m, p m d -> p d")
    return KeptSources(cols, writes, pos, stage, torch.argsort(order), starts, below.tolist(), torch.cumsum(per_stage, 0),
                       per_stage, extra)


@dataclass
class EdgeRows:
    """In-edges of a batch of readers from the kept nodes, and the summed direct effect of the dropped ones."""

    kept: Float[Tensor, "batch k"]  # A[b, s] for the kept sources s (columns as ``KeptSources.cols``)
    remainder: Float[Tensor, "batch"]
    constant: Float[Tensor, "batch"]


def edge_rows(lm: LinearisedModel, sources: KeptSources, readers: list[Target], autograd: bool = False) -> EdgeRows:
    """One backward pass for the readers, then their direct effects from the kept sources and the dropped sum.

    A transcoder-feature reader meets only the kept sources at its own position that precede it: one product
    ``[readers at p, d_model] x [d_model, kept at p below their stage]`` per position that has such readers.
    The other readers meet the kept sources below the highest of their stages at every position any of them
    reads: one product per such position, written transposed so that each position's block is contiguous.
    Sources a reader cannot see (a later stage) are zeroed after the products. Remainders are one dot per reader
    with the dropped writes of its stage. So the cost grows with the kept nodes, not with every active node.
    ``autograd`` as in ``compact_reading_vectors``.
    """
    if lm.needs_descent:
        return _edge_rows_descending(lm, sources, readers, autograd)
    rv = compact_reading_vectors(lm, readers, autograd=autograd)
    n, k = len(readers), len(sources.cols)
    opts = dict(dtype=lm.dtype, device=lm.device)
    writes, remainder = sources.writes, torch.empty(n, **opts)
    local = torch.zeros(len(rv.local_rows), k, **opts)  # sources in position order
    for p, run in _runs(rv.local_pos, lambda p: p):
        a, b = run[0], run[-1] + 1
        start = sources.starts[p]
        stop = start + sources.below[p][max(rv.stages[r] for r in rv.local_rows[a:b])]
        if stop > start:
            local[a:b, start:stop] = rv.local[a:b] @ writes[start:stop].T
    if rv.local_rows:
        loc_stage, loc_pos = rv.stage[rv.local_rows], torch.tensor(rv.local_pos, device=lm.device)
        remainder[rv.local_rows] = (rv.local * sources.dropped[loc_stage, loc_pos]).sum(-1)
    spread = rv.spread
    spread_T = torch.zeros(k, len(rv.spread_rows), **opts)  # transposed, so that each position's block is contiguous
    if rv.spread_rows:
        top = max(rv.stages[r] for r in rv.spread_rows)
        for p in rv.read:
            start = sources.starts[p]
            stop = start + sources.below[p][top]
            if stop > start:
                torch.mm(writes[start:stop], spread[:, p].T, out=spread_T[start:stop])
        rem = torch.empty(len(rv.spread_rows), **opts)
        for t, run in _runs(rv.spread_rows, lambda r: rv.stages[r]):
            a, b = run[0], run[-1] + 1
            rem[a:b] = spread[a:b].flatten(1) @ sources.dropped[t].flatten()
        remainder[rv.spread_rows] = rem
    # Batch rows and source columns in position order, then the sources a reader cannot see zeroed, then the
    # columns put back in node-index order.
    kept = torch.empty(n, k, **opts)
    kept[rv.spread_rows] = spread_T.T
    kept[rv.local_rows] = local
    kept.masked_fill_(sources.stage[None, :] >= rv.stage[:, None], 0.0)
    kept = kept.index_select(1, sources.unsort)
    return EdgeRows(kept, remainder, rv.constant)


def _edge_rows_descending(lm: LinearisedModel, sources: KeptSources, readers: list[Target],
                          autograd: bool) -> EdgeRows:
    """``edge_rows`` where attention passes through: one descent (``LinearisedModel.descend``) per batch.

    At each stage t the readers' vectors of that stage meet the kept sources of stage t at each position (one
    product per position), the stage's constant write and its dropped writes; the pass-through stages carry the
    vectors down. The readers' constants are their biases plus what the descent reads from the constant writes.
    """
    rv = compact_reading_vectors(lm, readers, autograd=autograd, constants=False)
    n, k = len(readers), len(sources.cols)
    opts = dict(dtype=lm.dtype, device=lm.device)
    kept = torch.zeros(n, k, **opts)  # columns in position order, as ``sources.writes``
    remainder = torch.zeros(n, **opts)
    constant = rv.h0.clone()
    layout = sources.stage_layout(lm.n_pos)
    has_dropped = sources.dropped_at.flatten(1).abs().amax(1) > 0
    has_constant = lm._const_writes.abs().amax(1) > 0
    # Attention is causal: only positions up to the batch's last reader position can reach it.
    P = max(r.max_pos for r in readers) + 1
    for t, G in lm.descend(rv.dense()[:, :P], rv.stage):
        if has_constant[t]:
            constant += G.sum(1) @ lm.constant_write(t)
        if has_dropped[t + 1]:
            remainder += einsum(G, sources.dropped_at[t + 1, :P], "b p d, p d -> b")
        if t in layout:
            padded, pos, slot, rows = layout[t]
            seen = pos < P
            dots = torch.bmm(G.transpose(0, 1), padded[:P].transpose(1, 2))  # [pos, batch, m]
            kept[:, rows[seen]] += dots[pos[seen], :, slot[seen]].T
    return EdgeRows(kept.index_select(1, sources.unsort), remainder, constant)


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
    pending: dict[int, Tensor] = {}  # what a cross-layer transcoder's features get from their writes into later layers
    for stage in tqdm(range(target.stage(lm) - 1, -1, -1), desc="hierarchical attribution", disable=not progress, leave=False):
        G_stage = torch.zeros_like(G)
        for i, dirs in lm.extra_at.get(stage, []):
            part = (einsum(G, dirs, "b p d, p m d -> b p m") * lm.groups[i].activation)[0]
            pending[i] = pending[i] + part if i in pending else part
        for i, group in lm.groups_at(stage):
            if group.n_nodes == 0:
                continue
            T = (lm.unit_dots(group, G) * group.activation)[0]  # [pos, m]
            if i in pending:
                T = T + pending.pop(i)
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
                weight = T[p_k, j_k] / group.activation[p_k, j_k]
                G_stage = G_stage + compact_reading_vectors(lm, readers, constants=False).weighted_sum(weight)[None]
        if stage in lm.linear_stages:  # a pass-through (attention, skip path): what reads its output reads its input
            G = G + lm.pass_back(stage, G)
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
                dst: Tensor, sources: KeptSources | None = None, batch_size: int = 64) -> Float[Tensor, "e n_heads"]:
    """Per-head parts of edges into attention features (NaN for other edges).

    The per-head reading vector of an attention feature is ``pattern[h, q, k] (u_h - mean u_h) / scale1[k]`` with
    ``u_h = W_V[h] w_h`` (centred: ``LinearisedModel.value_reader``); each edge's part through head h is its source's
    write dotted with it. The parts sum to the edge, which comes from the reading vector of ``reading_vectors``.
    Per attention layer, one product of every reader's ``u`` with every source's write, then a gather at the
    edges (rather than one ``u`` per edge). Where an attention layer below the readers' passes through, a source
    also reaches head h along paths through it: the parts of that layer's edges are then the edge rows of the
    head-restricted readers (``FeatureTarget.head``) from ``sources``, which must be given.
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
        if any(t < attn_stage(L) for t in [*lm.linear_stages, *lm.extra_at]):
            parts[e] = _head_parts_descending(lm, readers, src[e], dst[e], sources, batch_size)
            continue
        rows, r_local = torch.unique(dst[e], return_inverse=True)
        cols, s_local = torch.unique(src[e], return_inverse=True)
        q = torch.tensor([readers[j].pos for j in rows.tolist()], device=lm.device)
        feat = torch.tensor([readers[j].feature for j in rows.tolist()], device=lm.device)
        w_h = split_heads(lm, lm.encoder_rows("attn_feature", L, feat))
        u = torch.bmm(w_h.transpose(0, 1), lm.value_reader(L))  # [head, reader, d_model], centred (``value_reader``)
        writes = index.unit_writes(cols) * index.activation[cols][:, None]  # a_s d_s, once per source
        dots = einsum(u, writes, "h r d, s d -> r s h")[r_local, s_local]  # [edges, heads]
        k = index.pos[src[e]]
        pattern = lm.patterns[L][:, q[r_local], k]  # [heads, edges]
        parts[e] = dots * rearrange(pattern, "h e -> e h") / lm.scale_ln1[L][k][:, None]
    return parts


def _head_parts_descending(lm: LinearisedModel, readers: list[Target], src: Tensor, dst: Tensor,
                           sources: KeptSources, batch_size: int) -> Float[Tensor, "e n_heads"]:
    """Per-head parts of edges into attention features of one layer, from head-restricted edge rows."""
    n_heads = lm.cfg.n_heads
    rows, r_local = torch.unique(dst, return_inverse=True)
    col_of = torch.full((int(sources.cols.max()) + 1 if len(sources.cols) else 1,), -1, dtype=torch.long, device=lm.device)
    col_of[sources.cols] = torch.arange(len(sources.cols), device=lm.device)
    s_local = col_of[src]
    heads = [FeatureTarget(readers[j].kind, readers[j].layer, readers[j].feature, readers[j].pos, head=h)
             for j in rows.tolist() for h in range(n_heads)]
    per_head = torch.cat([edge_rows(lm, sources, heads[a : a + batch_size]).kept for a in range(0, len(heads), batch_size)])
    per_head = per_head.view(len(rows), n_heads, -1)
    return per_head[r_local, :, s_local]


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
    heads = _head_parts(lm, index, readers, src_t, dst_t, sources, batch_size)
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
