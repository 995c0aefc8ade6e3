"""The ``Circuit``: a local circuit as plain data, its networkx form and its files.

1. :func:`build_circuit` turns an :class:`~circuits.attribution.Attribution` into nodes and edges with the
   attribute names of the file formats: node ``kind`` (``embed``, ``pos_embed``, ``attn_feature``,
   ``attn_error``, ``mlp_feature``, ``mlp_error``, ``target``), ``layer`` (-1 for embeddings; for a logit
   target ``n_layers``), ``pos``, ``feature`` (-1 where none), ``activation`` (the target's pre-activation
   for the target), ``constant`` and ``remainder`` (0 for nodes without in-edges), ``influence`` (``T_s``);
   edge ``weight`` (the direct effect) and, on edges into attention features, ``head`` (the head with the
   largest part), ``head_weights`` (the per-head parts, which sum to ``weight``) and ``src_pos``.
2. :meth:`Circuit.to_networkx` gives a ``DiGraph`` whose graph attributes are ``model``, ``prompt``,
   ``tokens``, ``target``, ``max_relative_residual`` (plus the threshold and scores).
3. Files: networkx node-link JSON, GraphML (lists stored as JSON strings), and the attribution-graph JSON
   read by circuit-tracer's and Neuronpedia's viewers (``metadata``/``qParams``/``nodes``/``links``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from circuits.attribution import Attribution
from circuits.linear_model import LinearisedModel
from circuits.targets import AttentionScoreTarget, FeatureTarget, LogitTarget

log = logging.getLogger(__name__)

TARGET_ID = "target"


@dataclass
class Circuit:
    """A local circuit. Node and edge dicts carry exactly the attributes written to the files."""

    model: str
    prompt: str
    tokens: list[str]
    target: str
    target_value: float
    threshold: float
    max_relative_residual: float
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    n_layers: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    faithfulness: list[dict[str, float]] = field(default_factory=list)
    qk: dict[str, Any] | None = None

    def node(self, node_id: str) -> dict[str, Any]:
        return next(n for n in self.nodes if n["id"] == node_id)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n["kind"]] = out.get(n["kind"], 0) + 1
        return out

    def edge_counts(self) -> dict[str, int]:
        kinds = {n["id"]: n["kind"] for n in self.nodes}
        out: dict[str, int] = {}
        for e in self.edges:
            key = f"{kinds[e['source']]}->{kinds[e['target']]}"
            out[key] = out.get(key, 0) + 1
        return out

    def completeness_residuals(self) -> dict[str, float]:
        """For every node with in-edges: |activation - (in-edges + constant + remainder)| / scale."""
        incoming: dict[str, list[float]] = {}
        for e in self.edges:
            incoming.setdefault(e["target"], []).append(e["weight"])
        out = {}
        for n in self.nodes:
            if n["kind"] in ("attn_feature", "mlp_feature", "target"):
                w = incoming.get(n["id"], [])
                total = math.fsum(w) + n["constant"] + n["remainder"]
                scale = max(abs(n["activation"]), math.fsum(abs(x) for x in w) + abs(n["constant"]) + abs(n["remainder"]), 1e-300)
                out[n["id"]] = abs(n["activation"] - total) / scale
        return out

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph(model=self.model, prompt=self.prompt, tokens=list(self.tokens), target=self.target,
                       target_value=self.target_value, threshold=self.threshold,
                       max_relative_residual=self.max_relative_residual, n_layers=self.n_layers, **{f"score_{k}": v for k, v in self.scores.items()})
        for n in self.nodes:
            g.add_node(n["id"], **{k: v for k, v in n.items() if k != "id"})
        for e in self.edges:
            g.add_edge(e["source"], e["target"], **{k: v for k, v in e.items() if k not in ("source", "target")})
        return g

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Circuit":
        return cls(**d)

    def copy_with(self, **changes: Any) -> "Circuit":
        return replace(self, **changes)


def _top_tokens(lm: LinearisedModel, writes: torch.Tensor, k: int = 3) -> list[list[str]]:
    """The tokens each residual direction promotes most through the unembedding (centred, scale ignored)."""
    if len(writes) == 0:
        return []
    centred = writes - writes.mean(-1, keepdim=True)
    top = (centred @ lm.model.W_U).topk(k, dim=-1).indices
    tok = lm.model.tokenizer
    return [[tok.decode([int(i)]) for i in row] for row in top]


def node_id(kind: str, layer: int, pos: int, feature: int) -> str:
    if kind == "embed":
        return f"embed@{pos}"
    if kind == "pos_embed":
        return f"pos_embed@{pos}"
    if kind in ("attn_error", "mlp_error"):
        return f"{kind[:-6]}{layer}.error@{pos}"
    if kind == "mlp_output":
        return f"mlp{layer}.out@{pos}"
    return f"{kind[:-8]}{layer}:{feature}@{pos}"


def _target_layer(lm: LinearisedModel, target) -> int:
    layer = int(getattr(target, "layer", -1))
    return lm.n_layers if isinstance(target, LogitTarget) or layer < 0 else layer


def build_circuit(lm: LinearisedModel, attribution: Attribution, prompt: str, model_name: str,
                  top_k_tokens: int = 3) -> Circuit:
    """Step 1 of the module docstring."""
    a, index = attribution, attribution.index
    kept = a.hierarchy.kept.nonzero()[:, 0]
    with torch.no_grad():
        tops = _top_tokens(lm, index.unit_writes(kept), top_k_tokens)
    reader_of = {int(c): r for r, c in enumerate(a.reader_cols.tolist()) if c >= 0}
    strings = lm.token_strings()
    nodes: list[dict[str, Any]] = []
    ids: dict[int, str] = {}
    for j, c in enumerate(kept.tolist()):
        kind, layer, pos, feat = index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c])
        nid = node_id(kind, layer, pos, feat)
        ids[c] = nid
        r = reader_of.get(c)
        nodes.append(dict(
            id=nid, kind=kind, layer=layer, pos=pos, feature=feat, token=strings[pos],
            activation=float(index.activation[c]), influence=float(a.hierarchy.influence[c]),
            constant=float(a.reader_constant[r]) if r is not None else 0.0,
            remainder=float(a.reader_remainder[r]) if r is not None else 0.0,
            top_tokens=tops[j],
        ))
    t = a.target
    tpos = t.query_pos if isinstance(t, AttentionScoreTarget) else t.pos
    nodes.append(dict(
        id=TARGET_ID, kind="target", layer=_target_layer(lm, t), pos=int(tpos),
        feature=int(t.feature) if isinstance(t, FeatureTarget) else -1, token=strings[tpos],
        activation=float(a.reader_value[0]), influence=float(a.reader_value[0]),
        constant=float(a.reader_constant[0]), remainder=float(a.reader_remainder[0]), top_tokens=[],
        spec=getattr(t, "spec", str(t)),
    ))
    reader_ids = [TARGET_ID] + [ids[int(c)] for c in a.reader_cols[1:].tolist()]
    edges: list[dict[str, Any]] = []
    has_heads = (~torch.isnan(a.edge_heads[:, 0])).tolist() if a.edge_heads is not None else [False] * len(a.edge_src)
    head_parts = a.edge_heads.tolist() if a.edge_heads is not None else None
    src_pos = index.pos[a.edge_src].tolist()
    for e, (s, d, w) in enumerate(zip(a.edge_src.tolist(), a.edge_dst.tolist(), a.edge_weight.tolist())):
        edge: dict[str, Any] = dict(source=ids[s], target=reader_ids[d], weight=w)
        if has_heads[e]:
            parts = head_parts[e]
            edge.update(head=max(range(len(parts)), key=lambda h: abs(parts[h])), head_weights=parts, src_pos=src_pos[e])
        edges.append(edge)
    return Circuit(
        model=model_name, prompt=prompt, tokens=strings, target=getattr(t, "spec", str(t)), target_value=float(a.reader_value[0]),
        threshold=a.threshold, max_relative_residual=a.max_relative_residual, nodes=nodes, edges=edges,
        n_layers=lm.n_layers,
    )


# ---------------------------------------------------------------------------------------------- files
def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def write_node_link(circuit: Circuit, path: Path) -> None:
    """networkx node-link JSON (``nx.node_link_graph`` reads it back)."""
    data = nx.node_link_data(circuit.to_networkx())
    data["circuit"] = {"scores": circuit.scores, "faithfulness": circuit.faithfulness, "qk": circuit.qk}
    Path(path).write_text(json.dumps(data, default=_json_default))


def write_graphml(circuit: Circuit, path: Path) -> None:
    """GraphML; list-valued attributes (tokens, head_weights, top_tokens) are stored as JSON strings."""
    g = circuit.to_networkx()
    for key, value in list(g.graph.items()):
        if isinstance(value, (list, dict)):
            g.graph[key] = json.dumps(value)
    for _, attrs in g.nodes(data=True):
        for key, value in list(attrs.items()):
            if isinstance(value, (list, dict)):
                attrs[key] = json.dumps(value)
    for _, _, attrs in g.edges(data=True):
        for key, value in list(attrs.items()):
            if isinstance(value, (list, dict)):
                attrs[key] = json.dumps(value)
    nx.write_graphml(g, str(path))


_FEATURE_TYPES = {
    "embed": "embedding", "pos_embed": "embedding", "attn_feature": "lorsa", "mlp_feature": "cross layer transcoder",
    "attn_error": "lorsa error", "mlp_error": "mlp reconstruction error", "mlp_output": "mlp reconstruction error",
}


def attribution_graph_json(circuit: Circuit, slug: str = "circuit") -> dict[str, Any]:
    """The attribution-graph JSON of circuit-tracer's ``create_graph_files`` and Neuronpedia's viewer.

    Attention-SAE features are given the viewer's attention-feature type ``lorsa`` and ids prefixed ``A``;
    position embeddings are ``embedding`` nodes with ids ``P_pos_pos``. Non-logit targets keep their own type.
    """
    n_layers = circuit.n_layers
    n_ctx = len(circuit.tokens)
    out_nodes, js_ids = [], {}
    for n in circuit.nodes:
        kind, layer, pos, feat = n["kind"], n["layer"], n["pos"], n["feature"]
        if kind == "embed":
            nid, layer_s = f"E_{feat if feat >= 0 else pos}_{pos}", "E"
        elif kind == "pos_embed":
            nid, layer_s = f"P_{pos}_{pos}", "E"
        elif kind in ("attn_error", "mlp_error", "mlp_output"):
            nid, layer_s = f"{'A' if kind == 'attn_error' else ''}{layer}_-1_{pos}", str(layer)
        elif kind == "target":
            layer_s = str(n_layers + 1) if circuit.target.startswith("logit") else str(layer)
            nid = f"{layer_s}_{feat}_{pos}_target"
        else:
            nid, layer_s = f"{'A' if kind == 'attn_feature' else ''}{layer}_{feat}_{pos}", str(layer)
        js_ids[n["id"]] = nid
        is_logit = kind == "target" and circuit.target.startswith("logit")
        clerp = f"{n['id']}: " + ", ".join(repr(t) for t in n.get("top_tokens", []))
        out_nodes.append(dict(
            node_id=nid, feature=int(feat), layer=layer_s, ctx_idx=int(pos),
            feature_type="logit" if is_logit else _FEATURE_TYPES.get(kind, kind), token_prob=0.0,
            is_target_logit=is_logit, run_idx=0, reverse_ctx_idx=n_ctx - 1 - int(pos), jsNodeId=nid,
            clerp=circuit.target if kind == "target" else clerp, influence=float(n["influence"]),
            activation=float(n["activation"]),
        ))
    links = [dict(source=js_ids[e["source"]], target=js_ids[e["target"]], weight=float(e["weight"])) for e in circuit.edges]
    return dict(
        metadata=dict(slug=slug, scan=circuit.model, transcoder_list=[], prompt_tokens=list(circuit.tokens),
                      prompt=circuit.prompt, node_threshold=circuit.threshold, schema_version=1),
        qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
        nodes=out_nodes, links=links,
    )


def write_attribution_graph(circuit: Circuit, path: Path, slug: str = "circuit") -> None:
    Path(path).write_text(json.dumps(attribution_graph_json(circuit, slug)))


def read_node_link(path: Path) -> nx.DiGraph:
    return nx.node_link_graph(json.loads(Path(path).read_text()))
