"""The ``Circuit``: a local circuit held as tensors (a node table and a sparse adjacency), its views and files.

1. :func:`build_circuit` turns an :class:`~circuits.attribution.Attribution` into tensors without a Python loop over
   edges. Node 0 is the target; the others are the kept nodes in node-index (stage) order. Node columns:
   ``node_kind`` (codes of ``sites.KINDS``), ``node_layer`` (-1 for embeddings; a logit target's is
   ``n_layers``), ``node_pos``, ``node_feature`` (-1 where none), ``node_activation`` (the target's value for the
   target), ``node_attribution`` (the hierarchical total attribution ``T_s`` to the target; the target's value for
   the target), ``node_influence`` (graph influence, ``circuits.influence``; 0 for the target), ``node_constant``
   and ``node_remainder`` (0 for nodes without in-edges), ``node_shown``. Edge columns: ``edge_src`` and
   ``edge_dst`` (node indices), ``edge_weight`` (the direct effect), ``edge_shown``. Edges into attention features
   carry their split by head: ``head_edge`` (edge indices) and ``head_weights`` (one row of per-head parts per such
   edge, summing to its weight; the source position is the source node's).
2. Every kept node and edge stays; ``shown`` marks the view that pruning by influence keeps
   (``circuits.influence.prune``, a step of ``circuits.trace.trace``). :meth:`Circuit.shown_view` restricts a
   circuit to it, moving the weight of every hidden in-edge of a shown node into that node's remainder, so that
   each node of the view still satisfies ``activation = in-edges + constant + remainder``.
3. Users read frozen :class:`Node` and :class:`Edge` views (``circuit.node(id)``, ``circuit.nodes()``,
   ``circuit.edges()``); dicts appear only in the writers below.
4. Files, each written atomically (a temporary file in the same folder, then a rename):
   - ``graph.safetensors`` + ``graph_meta.json`` (:meth:`Circuit.save`, :meth:`Circuit.load`): the compact, exact
     form of the whole circuit (every kept node and edge, the ``shown`` masks, head parts, scores, the
     faithfulness curve and the QK table). This is the format to reload in Python; it stays small and fast for
     millions of edges.
   - ``graph.json``: networkx node-link JSON (``nx.node_link_graph`` reads it), for networkx and other graph
     tools; ``graph.graphml``: GraphML (lists stored as JSON strings), for Gephi, Cytoscape and igraph. Both
     hold the shown view by default (``full=True`` writes every kept edge: large for big graphs).
   - ``attribution_graph.json``: the attribution-graph JSON read by circuit-tracer's and Neuronpedia's
     frontends (``metadata``/``qParams``/``nodes``/``links``, checked against circuit-tracer's pydantic
     models), shown view by default. Conventions there:
     - ``feature_type`` is one of ``embedding``, ``cross layer transcoder`` (transcoder features),
       ``mlp reconstruction error`` (transcoder errors, and a frozen MLP output where a layer has no
       transcoder), ``lorsa`` (attention-SAE features), ``lorsa error`` (attention-SAE errors), ``logit``.
     - ids: token embeddings ``E_{token id}_{pos}`` (``feature`` = pos, layer ``E``); position embeddings are
       ``embedding`` nodes too, with ids ``P_{pos}_{pos}`` (layer ``E``, clerp ``position {pos}``); transcoder
       features ``{layer}_{feature}_{pos}``; attention-SAE features ``A{layer}_{feature}_{pos}``; errors and
       MLP outputs ``{layer}_-1_{pos}`` (MLP) and ``A{layer}_-1_{pos}`` (attention), ``feature`` -1 (circuit-tracer's
       ``0_{layer}_{pos}`` would collide with the features of layer 0).
     - the target: a logit or logit-difference target is a ``logit`` node ``{n_layers + 1}_{token id}_{pos}``
       (the first token of a difference) with ``is_target_logit``; a feature target is a node of its own
       feature type with that feature's id; an attention-score target is a ``logit`` node
       ``{n_layers + 1}_{head}_{query pos}`` (``feature`` = head, the key position in its clerp); a direction
       target a ``logit`` node ``{n_layers + 1}_0_{pos}``. Every target's ``clerp`` is ``target: {spec}``.
     - ``clerp`` carries a feature's label when labels are given (keyed by node id or by feature key such as
       ``mlp1:613``; else its node id), ``influence`` the graph influence and ``activation`` the activation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits import sites
from circuits.sites import FEATURE_KINDS, KIND_CODE, KINDS, TOKEN_KINDS

if TYPE_CHECKING:
    from circuits.attribution import Attribution
    from circuits.linear_model import LinearisedModel

log = logging.getLogger(__name__)

SCHEMA = 1
NODE_COLUMNS = ("kind", "layer", "pos", "feature", "activation", "attribution", "influence", "constant", "remainder", "shown")
EDGE_COLUMNS = ("src", "dst", "weight", "shown")
INDEX_COLUMNS = ("edge_src", "edge_dst", "head_edge")


@dataclass(frozen=True)
class TargetInfo:
    """What the target is, as plain data: ``kind`` is ``mlp_feature``, ``attn_feature``, ``logit``,
    ``attention_score`` or ``direction``; unused fields keep their defaults."""

    kind: str
    spec: str
    layer: int = -1
    pos: int = 0
    feature: int = -1
    head: int = -1
    key_pos: int = -1
    tokens: tuple[int, ...] = ()
    coefficients: tuple[float, ...] = ()
    hook: str = ""

    @classmethod
    def of(cls, target, n_layers: int) -> "TargetInfo":
        from circuits.targets import AttentionScoreTarget, DirectionTarget, FeatureTarget, LogitTarget

        spec = getattr(target, "spec", str(target))
        if isinstance(target, FeatureTarget):
            return cls(target.kind, spec, target.layer, target.pos, target.feature, -1 if target.head is None else target.head)
        if isinstance(target, LogitTarget):
            return cls("logit", spec, n_layers, target.pos, tokens=tuple(target.tokens), coefficients=tuple(target.coefficients))
        if isinstance(target, AttentionScoreTarget):
            return cls("attention_score", spec, target.layer, target.query_pos, head=target.head, key_pos=target.key_pos)
        if isinstance(target, DirectionTarget):
            layer = target.layer if target.layer >= 0 else n_layers
            return cls("direction", spec, layer, target.pos, hook=target.hook)
        raise TypeError(f"unknown target type {type(target).__name__}")


@dataclass(frozen=True)
class Node:
    """One node of a circuit (a view of row ``index`` of the node table)."""

    index: int
    id: str
    kind: str
    layer: int
    pos: int
    feature: int
    token: str
    activation: float
    attribution: float
    influence: float
    constant: float
    remainder: float
    shown: bool

    @property
    def dictionary(self) -> str | None:
        """``attn3``/``mlp3`` for feature, error and MLP-output nodes, else None."""
        return None if self.kind in TOKEN_KINDS or self.kind == "target" else sites.dictionary_name(self.kind, self.layer)


@dataclass(frozen=True)
class Edge:
    """One edge: the direct effect of ``source`` on ``target`` (node ids); ``head_weights`` for edges into
    attention features (per-head parts summing to ``weight``), else None."""

    index: int
    source: str
    target: str
    weight: float
    shown: bool
    src_pos: int
    head_weights: tuple[float, ...] | None = None

    @property
    def head(self) -> int | None:
        """The head with the largest part (None for edges not into attention features)."""
        if self.head_weights is None:
            return None
        return max(range(len(self.head_weights)), key=lambda h: abs(self.head_weights[h]))


@dataclass
class Circuit:
    """A local circuit: metadata, a node table and a sparse adjacency (module docstring, steps 1-2)."""

    model: str
    prompt: str
    tokens: list[str]
    token_ids: list[int]
    target_info: TargetInfo
    target_value: float
    threshold: float
    max_relative_residual: float
    n_layers: int
    n_heads: int
    node_kind: Int[Tensor, "n"]
    node_layer: Int[Tensor, "n"]
    node_pos: Int[Tensor, "n"]
    node_feature: Int[Tensor, "n"]
    node_activation: Float[Tensor, "n"]
    node_attribution: Float[Tensor, "n"]
    node_influence: Float[Tensor, "n"]
    node_constant: Float[Tensor, "n"]
    node_remainder: Float[Tensor, "n"]
    node_shown: Bool[Tensor, "n"]
    edge_src: Int[Tensor, "e"]
    edge_dst: Int[Tensor, "e"]
    edge_weight: Float[Tensor, "e"]
    edge_shown: Bool[Tensor, "e"]
    head_edge: Int[Tensor, "h"]
    head_weights: Float[Tensor, "h n_heads"]
    scores: dict[str, float] = field(default_factory=dict)
    faithfulness: list[dict[str, float]] = field(default_factory=list)
    qk: dict[str, Any] | None = None
    pruning: dict[str, float] | None = None  # the thresholds that made ``shown``; None: everything shown

    # ------------------------------------------------------------------------------------------- basics
    @property
    def target(self) -> str:
        """The target's text spec (``mlp3:211@5``, ``logit:" os"``, ``attn1.2:5->3``)."""
        return self.target_info.spec

    @property
    def n_nodes(self) -> int:
        return len(self.node_kind)

    @property
    def n_edges(self) -> int:
        return len(self.edge_src)

    @cached_property
    def ids(self) -> list[str]:
        kinds, layers, pos, feats = (t.tolist() for t in (self.node_kind, self.node_layer, self.node_pos, self.node_feature))
        return [sites.format_node_id(KINDS[k], l, p, f) for k, l, p, f in zip(kinds, layers, pos, feats)]

    @cached_property
    def _where(self) -> dict[str, int]:
        return {nid: i for i, nid in enumerate(self.ids)}

    def index_of(self, node_id: str) -> int:
        try:
            return self._where[node_id]
        except KeyError:
            raise KeyError(f"{node_id!r} is not a node of this circuit ({self.n_nodes} nodes)") from None

    def kind_mask(self, *kinds: str) -> Bool[Tensor, "n"]:
        codes = torch.tensor([KIND_CODE[k] for k in kinds], dtype=self.node_kind.dtype)
        return torch.isin(self.node_kind, codes)

    @property
    def node_stage(self) -> Int[Tensor, "n"]:
        """The stage each node writes at; the target one above every other node."""
        is_mlp = self.kind_mask("mlp_feature", "mlp_error", "mlp_output")
        stage = torch.where(self.kind_mask(*TOKEN_KINDS), torch.zeros_like(self.node_layer), 2 * self.node_layer + 1 + is_mlp.long())
        stage[self.kind_mask("target")] = 2 * self.n_layers + 2
        return stage

    # ------------------------------------------------------------------------------------------- views
    def node(self, node_id: str | int) -> Node:
        i = node_id if isinstance(node_id, int) else self.index_of(node_id)
        return Node(
            index=i, id=self.ids[i], kind=KINDS[int(self.node_kind[i])], layer=int(self.node_layer[i]), pos=int(self.node_pos[i]),
            feature=int(self.node_feature[i]), token=self.tokens[int(self.node_pos[i])], activation=float(self.node_activation[i]),
            attribution=float(self.node_attribution[i]), influence=float(self.node_influence[i]),
            constant=float(self.node_constant[i]), remainder=float(self.node_remainder[i]), shown=bool(self.node_shown[i]),
        )

    def nodes(self, shown_only: bool = False) -> list[Node]:
        cols = [t.tolist() for t in (self.node_kind, self.node_layer, self.node_pos, self.node_feature, self.node_activation,
                                     self.node_attribution, self.node_influence, self.node_constant, self.node_remainder, self.node_shown)]
        out = [Node(i, self.ids[i], KINDS[k], l, p, f, self.tokens[p], a, t, g, c, r, s)
               for i, (k, l, p, f, a, t, g, c, r, s) in enumerate(zip(*cols))]
        return [n for n in out if n.shown] if shown_only else out

    def edges(self, shown_only: bool = False) -> list[Edge]:
        """Edge views (a Python object per edge: for small circuits or the shown view)."""
        sel = self.edge_shown.nonzero()[:, 0] if shown_only else torch.arange(self.n_edges)
        heads: dict[int, tuple[float, ...]] = dict(zip(self.head_edge.tolist(), map(tuple, self.head_weights.tolist())))
        ids, pos = self.ids, self.node_pos.tolist()
        return [Edge(e, ids[s], ids[d], w, sh, pos[s], heads.get(e))
                for e, s, d, w, sh in zip(sel.tolist(), self.edge_src[sel].tolist(), self.edge_dst[sel].tolist(),
                                         self.edge_weight[sel].tolist(), self.edge_shown[sel].tolist())]

    def counts(self, shown_only: bool = False) -> dict[str, int]:
        kinds = self.node_kind[self.node_shown] if shown_only else self.node_kind
        c = torch.bincount(kinds.long(), minlength=len(KINDS)).tolist()
        return {KINDS[i]: n for i, n in enumerate(c) if n}

    def edge_counts(self, shown_only: bool = False) -> dict[str, int]:
        sel = self.edge_shown if shown_only else slice(None)
        pair = self.node_kind[self.edge_src[sel]].long() * len(KINDS) + self.node_kind[self.edge_dst[sel]].long()
        c = torch.bincount(pair, minlength=len(KINDS) ** 2).tolist()
        return {f"{KINDS[i // len(KINDS)]}->{KINDS[i % len(KINDS)]}": n for i, n in enumerate(c) if n}

    def completeness_residuals(self) -> Float[Tensor, "n"]:
        """For every node: |activation - (in-edges + constant + remainder)| / scale; 0 for nodes without in-edges
        (embeddings, errors, MLP outputs), whose activation is not a sum."""
        w = self.edge_weight.double()
        total = torch.zeros(self.n_nodes, dtype=torch.float64).index_add_(0, self.edge_dst, w)
        abs_total = torch.zeros(self.n_nodes, dtype=torch.float64).index_add_(0, self.edge_dst, w.abs())
        c, r, a = self.node_constant.double(), self.node_remainder.double(), self.node_activation.double()
        scale = torch.maximum(a.abs(), abs_total + c.abs() + r.abs()).clamp(min=1e-300)
        res = (a - (total + c + r)).abs() / scale
        return torch.where(self.kind_mask("target", *FEATURE_KINDS), res, torch.zeros_like(res))

    def head_parts(self) -> Float[Tensor, "e n_heads"]:
        """Per-head parts for every edge, NaN for edges not into attention features."""
        out = torch.full((self.n_edges, self.n_heads), float("nan"), dtype=self.head_weights.dtype)
        out[self.head_edge] = self.head_weights
        return out

    # ------------------------------------------------------------------------------------------- subsets
    def restricted(self, node_mask: Bool[Tensor, "n"], edge_mask: Bool[Tensor, "e"]) -> "Circuit":
        """The circuit on the given nodes (the target always) and edges among them; the weight of every dropped
        in-edge of a kept node moves into that node's remainder (module docstring, step 2)."""
        node_mask = node_mask.clone()
        node_mask[0] = True
        edge_mask = edge_mask & node_mask[self.edge_src] & node_mask[self.edge_dst]
        kept_edges = edge_mask.nonzero()[:, 0]
        w = self.edge_weight.double()
        moved = torch.zeros(self.n_nodes, dtype=torch.float64).index_add_(0, self.edge_dst, w)
        moved.index_add_(0, self.edge_dst[kept_edges], w[kept_edges], alpha=-1)  # the dropped in-edges' sum
        moved = moved.to(self.node_remainder.dtype)
        new_index = torch.full((self.n_nodes,), -1, dtype=torch.long)
        keep = node_mask.nonzero()[:, 0]
        new_index[keep] = torch.arange(len(keep))
        new_edge = torch.full((self.n_edges,), -1, dtype=torch.long)
        new_edge[kept_edges] = torch.arange(len(kept_edges))
        h = edge_mask[self.head_edge]
        out = replace(
            self,
            node_kind=self.node_kind[keep], node_layer=self.node_layer[keep], node_pos=self.node_pos[keep],
            node_feature=self.node_feature[keep], node_activation=self.node_activation[keep],
            node_attribution=self.node_attribution[keep], node_influence=self.node_influence[keep],
            node_constant=self.node_constant[keep], node_remainder=(self.node_remainder + moved)[keep], node_shown=self.node_shown[keep],
            edge_src=new_index[self.edge_src[kept_edges]], edge_dst=new_index[self.edge_dst[kept_edges]],
            edge_weight=self.edge_weight[kept_edges], edge_shown=self.edge_shown[kept_edges],
            head_edge=new_edge[self.head_edge[h]], head_weights=self.head_weights[h],
            scores=dict(self.scores), faithfulness=list(self.faithfulness),
        )
        out.__dict__.pop("ids", None)
        out.__dict__.pop("_where", None)
        return out

    def shown_view(self) -> "Circuit":
        """The shown nodes and edges only (``restricted`` to the masks)."""
        return self.restricted(self.node_shown, self.edge_shown)

    # ------------------------------------------------------------------------------------------- networkx
    def to_networkx(self, shown_only: bool = False) -> nx.DiGraph:
        c = self.shown_view() if shown_only else self
        g = nx.DiGraph(**c._graph_attributes())
        for n in c.nodes():
            g.add_node(n.id, **_node_dict(n, c))
        for e in c.edges():
            g.add_edge(e.source, e.target, **_edge_dict(e))
        return g

    def _graph_attributes(self) -> dict[str, Any]:
        return dict(model=self.model, prompt=self.prompt, tokens=list(self.tokens), token_ids=list(self.token_ids),
                    target=self.target, target_value=self.target_value, threshold=self.threshold,
                    max_relative_residual=self.max_relative_residual, n_layers=self.n_layers, n_heads=self.n_heads,
                    **{f"score_{k}": v for k, v in self.scores.items()})

    # ------------------------------------------------------------------------------------------- compact files
    def save(self, directory: Path) -> tuple[Path, Path]:
        """``graph.safetensors`` (node and edge tensors) and ``graph_meta.json`` (everything else) in ``directory``."""
        from saes.io import atomic_save_tensors, atomic_write_json

        directory = Path(directory)
        tensors = {f"node_{k}": getattr(self, f"node_{k}") for k in NODE_COLUMNS}
        tensors.update({f"edge_{k}": getattr(self, f"edge_{k}") for k in EDGE_COLUMNS})
        tensors.update(head_edge=self.head_edge, head_weights=self.head_weights)
        tensors = {k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in tensors.items()}
        for k in INDEX_COLUMNS:  # node and edge indices fit in int32: a quarter of a large file
            tensors[k] = tensors[k].to(torch.int32)
        atomic_save_tensors(tensors, directory / "graph.safetensors", metadata={"schema": str(SCHEMA)})
        meta = dict(
            schema=SCHEMA, model=self.model, prompt=self.prompt, tokens=self.tokens, token_ids=self.token_ids,
            target=self.target_info.__dict__, target_value=self.target_value, threshold=self.threshold,
            max_relative_residual=self.max_relative_residual, n_layers=self.n_layers, n_heads=self.n_heads,
            kinds=list(KINDS), node_ids=self.ids, scores=self.scores, faithfulness=self.faithfulness, qk=self.qk,
            pruning=self.pruning,
        )
        atomic_write_json(directory / "graph_meta.json", meta)
        return directory / "graph.safetensors", directory / "graph_meta.json"

    @classmethod
    def load(cls, directory: Path) -> "Circuit":
        """Read back what :meth:`save` wrote (exactly: same tensors, dtypes and metadata)."""
        from saes.io import read_json, read_tensors

        directory = Path(directory)
        meta = read_json(directory / "graph_meta.json")
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"{directory}/graph_meta.json has schema {meta.get('schema')!r}; this version reads schema {SCHEMA}")
        if meta["kinds"] != list(KINDS):
            raise ValueError(f"{directory}: node kind codes {meta['kinds']} differ from this version's {list(KINDS)}")
        t = read_tensors(directory / "graph.safetensors")
        missing = [k for k in [f"node_{c}" for c in NODE_COLUMNS] + [f"edge_{c}" for c in EDGE_COLUMNS] + ["head_edge", "head_weights"] if k not in t]
        if missing:
            raise ValueError(f"{directory}/graph.safetensors lacks {missing}; rewrite it with `circuits trace`")
        for k in ("node_shown", "edge_shown"):
            t[k] = t[k].bool()
        for k in INDEX_COLUMNS:
            t[k] = t[k].long()
        info = meta["target"]
        info = TargetInfo(**{**info, "tokens": tuple(info["tokens"]), "coefficients": tuple(info["coefficients"])})
        c = cls(model=meta["model"], prompt=meta["prompt"], tokens=meta["tokens"], token_ids=meta["token_ids"], target_info=info,
                target_value=meta["target_value"], threshold=meta["threshold"], max_relative_residual=meta["max_relative_residual"],
                n_layers=meta["n_layers"], n_heads=meta["n_heads"], **t, scores=meta["scores"], faithfulness=meta["faithfulness"],
                qk=meta["qk"], pruning=meta["pruning"])
        if c.ids != meta["node_ids"]:
            raise ValueError(f"{directory}: the node ids in graph_meta.json do not match the node tensors; the files are from different runs")
        return c


# ---------------------------------------------------------------------------------------------- building
def build_circuit(lm: "LinearisedModel", attribution: "Attribution", prompt: str, model_name: str) -> Circuit:
    """Step 1 of the module docstring: the circuit's tensors from an attribution (every node shown)."""
    a, index = attribution, attribution.index
    cpu = lambda x: x.detach().cpu()
    kept = cpu(a.hierarchy.kept).nonzero()[:, 0]
    k = len(kept)
    info = TargetInfo.of(a.target, lm.n_layers)
    group_kind = torch.tensor([KIND_CODE[g.kind] for g in lm.groups], dtype=torch.int8)
    group_layer = torch.tensor([g.layer for g in lm.groups], dtype=torch.long)
    groups = cpu(index.group)[kept]
    node_of_col = torch.full((index.n,), -1, dtype=torch.long)
    node_of_col[kept] = torch.arange(1, k + 1)
    reader_cols = cpu(a.reader_cols)
    reader_node = node_of_col[reader_cols.clamp(min=0)]
    reader_node[reader_cols < 0] = 0
    value = cpu(a.reader_value)
    dtype = value.dtype
    target_feature = info.feature if info.kind in FEATURE_KINDS else -1
    one = lambda x, rest: torch.cat([torch.tensor([x], dtype=rest.dtype), rest])
    constant = torch.zeros(k + 1, dtype=dtype)
    remainder = torch.zeros(k + 1, dtype=dtype)
    constant[reader_node] = cpu(a.reader_constant).to(dtype)
    remainder[reader_node] = cpu(a.reader_remainder).to(dtype)
    edge_src = node_of_col[cpu(a.edge_src)]
    edge_dst = reader_node[cpu(a.edge_dst)]
    n_heads = lm.cfg.n_heads
    if a.edge_heads is not None:
        heads = cpu(a.edge_heads)
        head_edge = (~torch.isnan(heads[:, 0])).nonzero()[:, 0]
        head_weights = heads[head_edge].to(dtype)
    else:
        head_edge, head_weights = torch.zeros(0, dtype=torch.long), torch.zeros(0, n_heads, dtype=dtype)
    token_ids = [int(t) for t in lm.tokens[0].tolist()]
    return Circuit(
        model=model_name, prompt=prompt, tokens=lm.token_strings(), token_ids=token_ids, target_info=info,
        target_value=float(value[0]), threshold=float(a.threshold), max_relative_residual=float(a.max_relative_residual),
        n_layers=lm.n_layers, n_heads=n_heads,
        node_kind=one(KIND_CODE["target"], group_kind[groups]),
        node_layer=one(info.layer, group_layer[groups]),
        node_pos=one(info.pos, cpu(index.pos)[kept].long()),
        node_feature=one(target_feature, cpu(index.feature)[kept].long()),
        node_activation=one(float(value[0]), cpu(index.activation)[kept].to(dtype)),
        node_attribution=one(float(value[0]), cpu(a.hierarchy.influence)[kept].to(dtype)),
        node_influence=torch.zeros(k + 1, dtype=dtype),
        node_constant=constant, node_remainder=remainder, node_shown=torch.ones(k + 1, dtype=torch.bool),
        edge_src=edge_src, edge_dst=edge_dst, edge_weight=cpu(a.edge_weight).to(dtype),
        edge_shown=torch.ones(len(edge_src), dtype=torch.bool), head_edge=head_edge, head_weights=head_weights,
    )


# ---------------------------------------------------------------------------------------------- writers
def _node_dict(n: Node, c: Circuit) -> dict[str, Any]:
    d = dict(kind=n.kind, layer=n.layer, pos=n.pos, feature=n.feature, token=n.token, activation=n.activation,
             attribution=n.attribution, influence=n.influence, constant=n.constant, remainder=n.remainder, shown=n.shown)
    if n.kind == "target":
        d["spec"] = c.target
    return d


def _edge_dict(e: Edge) -> dict[str, Any]:
    d: dict[str, Any] = dict(weight=e.weight, shown=e.shown)
    if e.head_weights is not None:
        d.update(head=e.head, head_weights=list(e.head_weights), src_pos=e.src_pos)
    return d


def _atomic_text_writer(path: Path):
    from saes.io import _atomic_target

    return _atomic_target(Path(path))


def write_node_link(circuit: Circuit, path: Path, full: bool = False) -> None:
    """networkx node-link JSON of the shown view (``full``: of every kept edge); ``nx.node_link_graph`` reads it.

    Written in chunks, without building a networkx graph, so that a full export of millions of edges streams."""
    c = circuit if full else circuit.shown_view()
    with _atomic_text_writer(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        graph = c._graph_attributes()
        extra = {"scores": c.scores, "faithfulness": c.faithfulness, "qk": c.qk, "pruning": c.pruning, "full": bool(full)}
        f.write('{"directed": true, "multigraph": false, "graph": ' + json.dumps(graph) + ', "circuit": ' + json.dumps(extra))
        f.write(', "nodes": ' + json.dumps([{"id": n.id, **_node_dict(n, c)} for n in c.nodes()]))
        f.write(', "edges": [')
        ids = c.ids
        heads = dict(zip(c.head_edge.tolist(), c.head_weights.tolist()))
        pos = c.node_pos.tolist()
        chunk = 200_000
        for start in range(0, c.n_edges, chunk):
            sl = slice(start, start + chunk)
            parts = []
            for e, s, d, w, sh in zip(range(start, min(start + chunk, c.n_edges)), c.edge_src[sl].tolist(), c.edge_dst[sl].tolist(),
                                      c.edge_weight[sl].tolist(), c.edge_shown[sl].tolist()):
                item = {"source": ids[s], "target": ids[d], "weight": w, "shown": sh}
                hw = heads.get(e)
                if hw is not None:
                    item.update(head=max(range(len(hw)), key=lambda h: abs(hw[h])), head_weights=hw, src_pos=pos[s])
                parts.append(json.dumps(item))
            f.write(("," if start else "") + ",".join(parts))
        f.write("]}")


def read_node_link(path: Path) -> nx.DiGraph:
    return nx.node_link_graph(json.loads(Path(path).read_text()), edges="edges")


def write_graphml(circuit: Circuit, path: Path, full: bool = False) -> None:
    """GraphML of the shown view (``full``: every kept edge); list-valued attributes are stored as JSON strings."""
    g = circuit.to_networkx(shown_only=not full)
    for key, value in list(g.graph.items()):
        if isinstance(value, (list, dict)):
            g.graph[key] = json.dumps(value)
    for _, _, attrs in g.edges(data=True):
        if "head_weights" in attrs:
            attrs["head_weights"] = json.dumps(attrs["head_weights"])
    with _atomic_text_writer(path) as tmp:
        nx.write_graphml(g, tmp)


def neuronpedia_id(c: Circuit, i: int) -> tuple[str, str, int, str]:
    """``(node_id, layer, feature, feature_type)`` of node ``i`` in the attribution-graph JSON (module docstring)."""
    kind, layer, pos, feat = KINDS[int(c.node_kind[i])], int(c.node_layer[i]), int(c.node_pos[i]), int(c.node_feature[i])
    if kind == "target":
        t = c.target_info
        if t.kind in FEATURE_KINDS:
            kind = t.kind
        else:
            top = str(c.n_layers + 1)
            second = t.tokens[0] if t.kind == "logit" else t.head if t.kind == "attention_score" else 0
            return f"{top}_{second}_{pos}", top, int(second), "logit"
    ftype = sites.NEURONPEDIA_FEATURE_TYPES[kind]
    if kind == "embed":
        return f"E_{c.token_ids[pos]}_{pos}", "E", pos, ftype
    if kind == "pos_embed":
        return f"P_{pos}_{pos}", "E", pos, ftype
    prefix = "A" if kind.startswith("attn") else ""
    if kind in FEATURE_KINDS:
        return f"{prefix}{layer}_{feat}_{pos}", str(layer), feat, ftype
    return f"{prefix}{layer}_-1_{pos}", str(layer), -1, ftype


def attribution_graph_json(circuit: Circuit, slug: str = "circuit", labels: dict[str, str] | None = None,
                           full: bool = False) -> dict[str, Any]:
    """The attribution-graph JSON of circuit-tracer's and Neuronpedia's frontends (conventions: module docstring)."""
    c = circuit if full else circuit.shown_view()
    labels = labels or {}
    n_ctx = len(c.tokens)
    out_nodes, js = [], []
    for n in c.nodes():
        nid, layer_s, feature, ftype = neuronpedia_id(c, n.index)
        js.append(nid)
        if n.kind == "target":
            clerp = f"target: {c.target}" + (f" (key position {c.target_info.key_pos})" if c.target_info.kind == "attention_score" else "")
        elif n.kind == "pos_embed":
            clerp = f"position {n.pos}"
        elif n.kind == "embed":
            clerp = sites.label_for(labels, n.id) or repr(n.token)
        else:
            clerp = sites.label_for(labels, n.id) or n.id
        out_nodes.append(dict(
            node_id=nid, feature=int(feature), layer=layer_s, ctx_idx=n.pos, feature_type=ftype, token_prob=0.0,
            is_target_logit=n.kind == "target" and ftype == "logit", run_idx=0, reverse_ctx_idx=n_ctx - 1 - n.pos,
            jsNodeId=nid, clerp=clerp, influence=n.influence, activation=n.activation,
        ))
    if len(set(js)) != len(js):
        raise AssertionError("attribution-graph node ids must be unique")
    links = [dict(source=js[s], target=js[d], weight=w)
             for s, d, w in zip(c.edge_src.tolist(), c.edge_dst.tolist(), c.edge_weight.tolist())]
    transcoders = sorted({sites.dictionary_name(KINDS[k], l) for k, l in zip(c.node_kind.tolist(), c.node_layer.tolist())
                          if KINDS[k] in FEATURE_KINDS})
    return dict(
        metadata=dict(slug=slug, scan=c.model, transcoder_list=transcoders, prompt_tokens=list(c.tokens),
                      prompt=c.prompt, node_threshold=(c.pruning or {}).get("node_threshold"), schema_version=1),
        qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
        nodes=out_nodes, links=links,
    )


def write_attribution_graph(circuit: Circuit, path: Path, slug: str = "circuit", labels: dict[str, str] | None = None,
                            full: bool = False) -> None:
    from saes.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(attribution_graph_json(circuit, slug, labels, full)))
