"""A self-contained interactive HTML page of a circuit's shown view (plotly, with plotly.js inlined: works offline).

1. Place each node at x = its token position (nodes sharing a position and layer spread out side by side)
   and y = its row in the forward pass: embeddings, then attention L and MLP L for each layer, the target on top.
2. Draw the edges as straight segments, blue for positive and red for negative weight, in a few width classes
   by |weight| (the target's in-edges, then the largest others up to ``max_edges``; the page says how many
   were left out).
3. Nodes are coloured by kind and sized by |attribution|; hovering shows the node, its activation, its
   attribution to the target, its graph influence, constant and remainder.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path

from circuits.graph import Circuit
from circuits.sites import row_names

log = logging.getLogger(__name__)

KIND_COLOURS = {
    "embed": "#7f7f7f", "pos_embed": "#bcbd22", "attn_feature": "#ff7f0e", "attn_error": "#8c564b",
    "mlp_feature": "#2ca02c", "mlp_error": "#17becf", "mlp_output": "#aec7e8", "target": "#9467bd",
}


def _plain(circuit: Circuit) -> tuple[list[dict], list[dict]]:
    """The shown view as the node and edge dicts this page draws."""
    view = circuit.shown_view()
    nodes = [dict(id=n.id, kind=n.kind, pos=n.pos, row=r, token=n.token, activation=n.activation, attribution=n.attribution,
                  graph_influence=n.influence, constant=n.constant, remainder=n.remainder)
             for n, r in zip(view.nodes(), _rows(view))]
    edges = [dict(source=e.source, target=e.target, weight=e.weight) for e in view.edges()]
    return nodes, edges


def _rows(c: Circuit) -> list[int]:
    from circuits.sites import KINDS, row_of

    return [row_of(KINDS[k], l, c.n_layers) for k, l in zip(c.node_kind.tolist(), c.node_layer.tolist())]


def layout(nodes: list[dict]) -> dict[str, tuple[float, float]]:
    cells: dict[tuple[int, float], list[dict]] = {}
    for n in nodes:
        cells.setdefault((n["pos"], n["row"]), []).append(n)
    pos: dict[str, tuple[float, float]] = {}
    for (p, row), members in cells.items():
        members.sort(key=lambda n: (n["kind"], -abs(n["attribution"])))
        k = len(members)
        for i, n in enumerate(members):
            dx = 0.0 if k == 1 else -0.4 + 0.8 * i / (k - 1)
            pos[n["id"]] = (p + dx, row)
    return pos


def _hover(n: dict) -> str:
    lines = [f"<b>{html.escape(n['id'])}</b> ({n['kind']})", f"token: {html.escape(repr(n.get('token', '')))}",
             f"activation: {n['activation']:.4g}", f"attribution: {n['attribution']:.4g}",
             f"graph influence: {n['graph_influence']:.4g}"]
    if n["kind"] in ("attn_feature", "mlp_feature", "target"):
        lines.append(f"constant: {n['constant']:.4g}, remainder: {n['remainder']:.4g}")
    return "<br>".join(lines)


def figure(circuit: Circuit, max_edges: int = 1500):
    import plotly.graph_objects as go

    nodes, edges = _plain(circuit)
    xy = layout(nodes)
    # the target's in-edges always, then the strongest of the rest (by |weight|)
    edges = sorted(edges, key=lambda e: (e["target"] != "target", -abs(e["weight"])))
    shown, hidden = edges[:max_edges], max(0, len(edges) - max_edges)
    fig = go.Figure()
    w_max = max((abs(e["weight"]) for e in shown), default=1.0) or 1.0
    classes = [(0.0, 0.1, 0.6), (0.1, 0.3, 1.5), (0.3, 0.6, 3.0), (0.6, 1.01, 5.0)]
    for sign, colour in ((1, "rgba(31,119,180,0.55)"), (-1, "rgba(214,39,40,0.55)")):
        for lo, hi, width in classes:
            xs, ys = [], []
            for e in shown:
                r = abs(e["weight"]) / w_max
                if (e["weight"] >= 0) == (sign > 0) and lo <= r < hi:
                    (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=colour, width=width), hoverinfo="skip",
                                         showlegend=False))
    infl_max = max((abs(n["attribution"]) for n in nodes), default=1.0) or 1.0
    for kind, colour in KIND_COLOURS.items():
        members = [n for n in nodes if n["kind"] == kind]
        if not members:
            continue
        fig.add_trace(go.Scatter(
            x=[xy[n["id"]][0] for n in members], y=[xy[n["id"]][1] for n in members], mode="markers", name=kind,
            marker=dict(color=colour, size=[8 + 22 * math.sqrt(abs(n["attribution"]) / infl_max) for n in members],
                        line=dict(color="black", width=1)),
            hovertext=[_hover(n) for n in members], hoverinfo="text",
        ))
    n_layers = circuit.n_layers
    rows = row_names(n_layers)
    title = (f"{html.escape(circuit.model)}: why {html.escape(circuit.target)} = {circuit.target_value:.4g}"
             f" | {len(nodes)} of {circuit.n_nodes} nodes, {len(edges)} of {circuit.n_edges} edges shown"
             f"{f' ({hidden} weakest not drawn)' if hidden else ''} | max relative residual {circuit.max_relative_residual:.2g}")
    fig.update_layout(
        title=title, template="plotly_white", hovermode="closest", height=max(500, 90 * (2 * n_layers + 2)),
        xaxis=dict(tickmode="array", tickvals=list(range(len(circuit.tokens))),
                   ticktext=[f"{i}: {html.escape(repr(t))}" for i, t in enumerate(circuit.tokens)], tickangle=-45, title="token position"),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, title="layer"),
    )
    return fig


def write_html(circuit: Circuit, path: Path, max_edges: int = 1500) -> None:
    """Write the page with plotly.js inlined (no network needed to view it), atomically."""
    from saes.io import atomic_write_text

    atomic_write_text(Path(path), figure(circuit, max_edges).to_html(include_plotlyjs=True, full_html=True))
    log.info("wrote %s", path)
