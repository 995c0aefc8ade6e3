"""The circuit explorer: one self-contained HTML page (scripts and styles inline, no network) for reading a circuit.

:func:`write_explorer` checks the explorer payload (``circuits.explorer_data``), embeds it as
``<script type="application/json" id="circuit-data">`` and inlines ``explorer_page/explorer.js`` and
``explorer_page/explorer.css`` into ``explorer_page/template.html``. The page then:

1. **Prunes** like circuit-tracer's ``prune_graph``. With ``A[dst, src]`` the edge weights and ``N = |A|`` with
   each row divided by its sum (in-edges of one node sum to 1; where the payload has the optional column
   ``nodes.remainder``, the node's |remainder| is added to the sum as unexplained input, as
   ``circuits/influence.py`` does for a thresholded graph), node influence is ``I = e_target (N + N^2 + ...)``,
   computed in one pass over the nodes in reverse topological order (the graph is a DAG through the model).
   Nodes are kept from the most influential down until ``node_threshold`` of the total influence is covered;
   token embeddings and the target always pass this step. On the graph of the kept nodes the influence is
   computed again and each edge scores ``N'[dst, src] (I'[dst] + [dst = target])``; edges are kept the same way
   up to ``edge_threshold``. Then, until nothing changes, features without a kept in-edge or out-edge and
   errors without a kept out-edge are dropped, with their edges; embeddings without a kept out-edge are hidden
   (their token stays written under the column). The page opens at ``meta.node_threshold`` and
   ``meta.edge_threshold`` (0.8 and 0.98); its sliders prune again from the full graph it carries.
2. **Lays out** rows = residual-stream stages (``payload["rows"]``: embeddings, attn0, mlp0, ..., target,
   bottom to top) and columns = token positions, the token written under each column. A column is as wide as
   its busiest cell needs (one 20 px slot per node), so no two nodes overlap.
3. **Draws** nodes as SVG (circles: features, coloured by attention or MLP; squares: errors and frozen outputs;
   bars: embeddings; diamond: the target) and edges on a canvas: width proportional to |weight|, blue for
   positive and red for negative. Only the strongest kept edges are drawn (300 by default, the "drawn" slider),
   plus every edge between the selected node and a shown node.
4. **Hover** shows a node's label, activation, attribution to the target and influence. **Click** highlights
   the node's in- and out-edges (the other end carries the weight) and fills the side panel: its feature card
   (top contexts with the token highlighted, top and bottom logits, activation histogram, scorecard numbers,
   dashboard link), or what an embedding or error node is, or ``meta.cards_note`` when no card was made; the
   edge lists with weights; for an attention feature the split of its in-edges by head and source position;
   for an attention-score target the QK pair table with both marginals.
5. **Subgraphs**: shift-click (or "pin selected") pins nodes; "subgraph" shows only the pinned nodes and all
   edges among them; "group pinned" makes a named supernode of the pinned nodes not yet grouped. The panel shows
   the Neuronpedia ``qParams`` (``pinnedIds``; ``supernodes`` as ``[name, id, id, ...]`` lists), with the
   payload's optional column ``nodes.np_id`` where present (Neuronpedia's node ids), else the node ids.

Scale: on a synthetic circuit of 2,200 nodes and 101,157 edges (an 8.4 MB page) chromium opens the page in 0.8 to
1.3 s (0.2 to 0.5 s of it the page's script) and re-prunes and redraws after a threshold change in 40 to 110 ms
(``pytest -m slow tests/test_explorer.py -k large -o log_cli=true --log-cli-level=INFO``).

JavaScript API (``window.explorer``; ``document.body.dataset.ready == "1"`` once it exists):

- ``visibleNodes()``: ids of the nodes shown now (pruned set, plus pinned and selected nodes).
- ``keptNodes()``, ``keptEdges()``: what the pruning alone keeps (``[src, dst]`` id pairs).
- ``select(id)``: select a node (``null`` clears); returns the selected id. ``selected()`` reads it back.
- ``panel()``: the side panel's text.
- ``setThresholds(node, edge)``: prune again; returns ``{nodes, edges}`` (shown nodes, kept edges).
  ``thresholds()`` reads them back; ``setMaxEdges(n)`` sets how many strongest edges are drawn.
- ``pin(ids)``, ``unpin(ids)``: pin or unpin nodes; ``pin`` returns the pinned ids in pin order.
- ``supernode(name, ids)``: group nodes (pinning them) into a named supernode; returns ``qParams()``.
- ``qParams()``: ``{pinnedIds, supernodes, linkType, clickedId, sg_pos}`` in Neuronpedia's form.
- ``search(text)``: ids whose id or label contains the text (case-insensitive, at most 50).
- ``setSubgraph(on)``: show only the pinned nodes.
- ``highlightedEdges()``, ``drawnEdges()``: ``[src, dst, weight]`` of the selected node's edges and of the
  edges drawn; ``nodeBoxes()``: the screen box ``{id, x, y, width, height}`` of every shown node;
  ``influence()``: every node's influence on the target; ``setZoom(z)``, ``fit()``;
  ``timings()``: ``{open_ms, threshold_ms}`` measured by the page.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from saes.io import atomic_write_text

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).parent / "explorer_page"
NODE_COLUMNS = ("id", "kind", "row", "pos", "layer", "feature", "activation", "attribution", "influence", "label", "card")
EDGE_COLUMNS = ("src", "dst", "weight")


def _check(payload: dict[str, Any]) -> None:
    """One clear error for a payload the page cannot read."""
    if not isinstance(payload, dict) or payload.get("schema") != 1:
        raise ValueError("explorer payload: expected a dict with schema 1 (build it with circuits.explorer_data.explorer_payload)")
    for key in ("meta", "tokens", "rows", "nodes", "edges"):
        if key not in payload:
            raise ValueError(f"explorer payload: missing {key!r} (build it with circuits.explorer_data.explorer_payload)")
    nodes, edges = payload["nodes"], payload["edges"]
    n = len(nodes.get("id", []))
    if n == 0:
        raise ValueError("explorer payload: the circuit has no nodes")
    for col in NODE_COLUMNS:
        if col not in nodes or len(nodes[col]) != n:
            raise ValueError(f"explorer payload: nodes.{col} must be a column of {n} values, one per node")
    m = len(edges.get("src", []))
    for col in EDGE_COLUMNS:
        if col not in edges or len(edges[col]) != m:
            raise ValueError(f"explorer payload: edges.{col} must be a column of {m} values, one per edge")
    if "target" not in nodes["kind"]:
        raise ValueError("explorer payload: no node of kind 'target'")
    n_rows, n_pos = len(payload["rows"]), len(payload["tokens"])
    if any(not 0 <= r < n_rows for r in nodes["row"]) or any(not 0 <= p < n_pos for p in nodes["pos"]):
        raise ValueError(f"explorer payload: node rows must index rows ({n_rows}) and positions must index tokens ({n_pos})")
    if any(not 0 <= i < n for i in edges["src"]) or any(not 0 <= i < n for i in edges["dst"]):
        raise ValueError(f"explorer payload: edge src and dst must be node indices in [0, {n})")


def finite_json(o: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def explorer_html(payload: dict[str, Any]) -> str:
    """The page's text: the template with the payload, the script and the styles inlined."""
    _check(payload)
    data = json.dumps(finite_json(payload), separators=(",", ":"), allow_nan=False)
    # inside <script> the text must not close the element: escape the characters HTML gives meaning to
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    meta = payload["meta"]
    parts = {
        "TITLE": html.escape(f"circuit: {meta.get('target', 'target')} ({meta.get('model', '')})"),
        "CSS": (PAGE_DIR / "explorer.css").read_text(),
        "JS": (PAGE_DIR / "explorer.js").read_text(),
        "DATA": data,
    }
    template = (PAGE_DIR / "template.html").read_text()
    # one pass, so that no inlined text is searched for markers
    return re.sub(r"@@(TITLE|CSS|JS|DATA)@@", lambda m: parts[m.group(1)], template)


def write_explorer(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the explorer page to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    text = explorer_html(payload)
    path = Path(path)
    atomic_write_text(path, text)
    log.info("wrote %s (%d nodes, %d edges, %.1f MB)", path, len(payload["nodes"]["id"]), len(payload["edges"]["src"]),
             len(text) / 1e6)
