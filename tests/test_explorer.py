"""The circuit explorer (``graph.html``) driven in a real browser: Debian's chromium through Playwright, with
every request other than the page's own ``file:`` URL aborted and recorded.

On a seeded synthetic circuit (with feature cards, head splits and a QK table) and on a circuit traced on the
embedded mini suite:

1. the page opens pruned, with fewer nodes shown than the file keeps, and asks for nothing over the network;
2. its pruning equals circuit-tracer's own ``prune_graph`` (run here on the dense adjacency) at several
   thresholds, and moving a threshold changes the count;
3. no two shown nodes overlap on screen;
4. a click on a feature node shows its card (label and a top context) and highlights exactly its edges to
   shown nodes;
5. pinning two nodes and grouping them gives the expected Neuronpedia ``qParams``;
6. a graph of 2,000 nodes and 100,000 edges opens and re-prunes in interactive time (the numbers are logged).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from circuits.explorer import write_explorer

log = logging.getLogger(__name__)

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

MINI_DIR = Path(__file__).resolve().parents[1] / "saes" / "mini"
DEMO_PROMPT = "import os\nimport sys\n\ndef main(args):\n    for name in args:\n        print(name"
FEATURE_KINDS = ("attn_feature", "mlp_feature")
TOKEN_KINDS = ("embed", "pos_embed")


# ------------------------------------------------------------------------------------ payloads
def synthetic_payload(seed: int = 0, n_layers: int = 2, n_pos: int = 8, max_features: int = 4, fan_in: int = 6,
                      n_heads: int = 4, cards: bool = True, remainders: bool = True) -> dict:
    """A random circuit in the payload's form: embeddings, features and errors per (stage, position), every
    destination reading ``fan_in`` random sources from earlier stages at its own or earlier positions."""
    rng = random.Random(seed)
    rows = ["embeddings"] + [f"{s}{layer}" for layer in range(n_layers) for s in ("attn", "mlp")] + ["target"]
    cols: dict[str, list] = {k: [] for k in ("id", "kind", "row", "pos", "layer", "feature", "activation",
                                             "attribution", "influence", "label", "card", "shown")}
    card_table: dict[str, dict] = {}
    words = ["import", " os", " sys", "\n", " def", " main", "(", " name", " for", " in", " print", ":"]
    tokens = [rng.choice(words) for _ in range(n_pos)]

    def add(nid, kind, row, pos, layer, feature=-1, label=None, card=None):
        for k, v in dict(id=nid, kind=kind, row=row, pos=pos, layer=layer, feature=feature,
                         activation=rng.uniform(0.1, 3.0), attribution=rng.gauss(0, 1), influence=0.0,
                         label=label or nid, card=card, shown=False).items():
            cols[k].append(v)

    add("target", "target", len(rows) - 1, n_pos - 1, n_layers - 1, 7, label="synthetic target")
    for p in range(n_pos):
        add(f"embed@{p}", "embed", 0, p, -1, label=repr(tokens[p]))
    for layer in range(n_layers):
        for stage, kind in ((2 * layer + 1, "attn"), (2 * layer + 2, "mlp")):
            for p in range(n_pos):
                for _ in range(rng.randint(0, max_features)):
                    f = rng.randrange(1000)
                    nid = f"{kind}{layer}:{f}@{p}"
                    if nid in cols["id"]:
                        continue
                    key = f"{kind}{layer}:{f}"
                    label = f"on {rng.choice(words)!r} -> {rng.choice(words)!r}"
                    add(nid, f"{kind}_feature", stage, p, layer, f, label=label, card=key if cards else None)
                    if cards and key not in card_table:
                        ctx = [rng.choice(words) for _ in range(9)]
                        card_table[key] = dict(
                            title=f"{kind}{layer} feature {f}", label=label,
                            contexts=[dict(tokens=ctx, index=4, activation=rng.uniform(1, 5))],
                            top_logits=[[" os", 1.5], [" sys", 1.2]], bottom_logits=[["(", -1.1]],
                            histogram=dict(edges=[0.0, 1.0, 2.0, 3.0], counts=[5, 3, 1]),
                            scorecard={"precision": 0.8}, dashboard=None)
                add(f"{kind}{layer}.error@{p}", f"{kind}_error", stage, p, layer, label=f"{kind}{layer} error")
    n = len(cols["id"])
    # the part of a node's input from sources an attribution threshold dropped
    cols["remainder"] = [rng.gauss(0, 0.3) if remainders and cols["kind"][i] in FEATURE_KINDS + ("target",) else 0.0
                         for i in range(n)]
    edges = {"src": [], "dst": [], "weight": [], "shown": []}
    heads = {"edge": [], "weights": [], "src_pos": []}
    readers = [i for i in range(n) if cols["kind"][i] in FEATURE_KINDS + ("target",)]
    for d in readers:
        srcs = [i for i in range(n) if cols["row"][i] < cols["row"][d] and cols["pos"][i] <= cols["pos"][d]
                and cols["kind"][i] != "target"]
        for s in rng.sample(srcs, min(fan_in, len(srcs))):
            w = rng.gauss(0, 1) * rng.choice([0.05, 0.3, 1.0])
            if cols["kind"][d] == "attn_feature":
                parts = [rng.random() for _ in range(n_heads)]
                total = sum(parts)
                heads["edge"].append(len(edges["src"]))
                heads["weights"].append([w * x / total for x in parts])
                heads["src_pos"].append(cols["pos"][s])
            edges["src"].append(s)
            edges["dst"].append(d)
            edges["weight"].append(w)
            edges["shown"].append(False)
    payload = dict(
        schema=1,
        meta=dict(model="synthetic", prompt="".join(tokens), target="synthetic", target_value=1.0,
                  max_relative_residual=0.0, threshold=0.0, n_layers=n_layers, n_heads=n_heads,
                  scores={"replacement": 0.5, "completeness": 0.9}, node_threshold=0.8, edge_threshold=0.98,
                  cards_note=None if cards else "no feature cards: no text was given"),
        tokens=tokens, rows=rows, nodes=cols, edges=edges, heads=heads,
        qk=dict(query_nodes=["embed@0", "constant"], key_nodes=["embed@1", "constant"], pairs=[[0.5, 0.1], [0.2, 0.05]],
                score=0.85, query_marginal=[0.6, 0.25], key_marginal=[0.7, 0.15]),
        cards=card_table,
    )
    _mark_shown(payload)
    return payload


# ------------------------------------------------------------------------------------ the reference pruning
def _dense(payload: dict):
    """The adjacency ``A[dst, src]`` in circuit-tracer's node order (features, errors, tokens, target), float64."""
    import torch

    nodes, edges = payload["nodes"], payload["edges"]
    kinds = nodes["kind"]
    group = lambda k: 0 if k in FEATURE_KINDS else 2 if k in TOKEN_KINDS else 3 if k == "target" else 1
    order = sorted(range(len(kinds)), key=lambda i: (group(kinds[i]), i))
    where = {i: j for j, i in enumerate(order)}
    A = torch.zeros(len(order), len(order), dtype=torch.float64)
    for s, d, w in zip(edges["src"], edges["dst"], edges["weight"]):
        A[where[d], where[s]] += w
    remainder = torch.tensor([abs(nodes.get("remainder", [0.0] * len(kinds))[i]) for i in order], dtype=torch.float64)
    counts = [sum(group(k) == g for k in kinds) for g in range(4)]
    return A, remainder, [nodes["id"][i] for i in order], counts


def reference_prune(payload: dict, node_threshold: float, edge_threshold: float) -> tuple[set[str], set[tuple[str, str]]]:
    """circuit-tracer's ``prune_graph`` rebuilt from its own ``compute_influence`` and ``find_threshold`` on the
    dense adjacency, with each node's |remainder| (where the payload has one) added to its row sum; then token
    embeddings without a kept out-edge are hidden, as the page does."""
    import torch
    from circuit_tracer.graph import compute_influence, find_threshold

    A, remainder, ids, (n_feat, n_err, n_tok, _) = _dense(payload)
    n = len(ids)
    lw = torch.zeros(n, dtype=torch.float64)
    lw[-1] = 1.0

    def normalise(M):
        return M.abs() / (M.abs().sum(1) + remainder).clamp(min=1e-10)[:, None]

    infl = compute_influence(normalise(A), lw)
    node_mask = infl >= find_threshold(infl, node_threshold)
    node_mask[n_feat + n_err:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalise(pruned)
    score = norm * (compute_influence(norm, lw) + lw)[:, None]
    edge_mask = (score >= find_threshold(score.flatten(), edge_threshold)) & (A != 0)
    edge_mask &= node_mask[:, None] & node_mask[None, :]
    while True:  # features need an in-edge and an out-edge, errors an out-edge
        old = node_mask.clone()
        node_mask[:n_feat + n_err] &= edge_mask[:, :n_feat + n_err].any(0)
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        if torch.equal(old, node_mask):
            break
    has_out = edge_mask.any(0)
    shown = {ids[j] for j in range(n) if node_mask[j] and (not n_feat + n_err <= j < n_feat + n_err + n_tok or has_out[j])}
    return shown, {(ids[s], ids[d]) for d, s in edge_mask.nonzero().tolist()}


def test_reference_is_circuit_tracers_prune_graph():
    """Without remainders the reference keeps what circuit-tracer's own ``prune_graph`` keeps."""
    import torch
    from circuit_tracer.graph import prune_graph

    payload = synthetic_payload(seed=5, remainders=False)
    A, _, ids, (n_feat, _, n_tok, _) = _dense(payload)
    graph = SimpleNamespace(input_tokens=list(range(n_tok)), logit_targets=[0], selected_features=list(range(n_feat)),
                            adjacency_matrix=A, logit_probabilities=torch.ones(1, dtype=torch.float64))
    for thresholds in [(0.8, 0.98), (0.5, 0.9), (0.95, 0.995)]:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # prune_graph makes its logit weights in the default dtype
        try:
            node_mask, edge_mask, _ = prune_graph(graph, *thresholds)
        finally:
            torch.set_default_dtype(old)
        has_out = edge_mask.any(0)
        tokens = range(len(ids) - 1 - n_tok, len(ids) - 1)
        shown = {ids[j] for j in range(len(ids)) if node_mask[j] and (j not in tokens or has_out[j])}
        assert reference_prune(payload, *thresholds) == (shown, {(ids[s], ids[d]) for d, s in edge_mask.nonzero().tolist()})
        assert 0 < len(shown) < len(ids)


def _mark_shown(payload: dict) -> None:
    shown, kept = reference_prune(payload, 0.8, 0.98)
    nodes, edges = payload["nodes"], payload["edges"]
    nodes["shown"] = [nid in shown for nid in nodes["id"]]
    edges["shown"] = [(nodes["id"][s], nodes["id"][d]) in kept for s, d in zip(edges["src"], edges["dst"])]


# ------------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """One explorer page in its own context, every non-file request aborted and recorded."""

    def __init__(self, browser, path: Path, width: int = 1500, height: int = 900):
        self.path = path
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.blocked: list[str] = []

        def route(r):
            if r.request.url.startswith("file:"):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()

        self.context.route("**/*", route)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        t = time.perf_counter()
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        self.open_s = time.perf_counter() - t

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def close(self):
        self.context.close()


def _open(browser, payload: dict, tmp: Path, name: str) -> Page:
    path = tmp / f"{name}.html"
    write_explorer(payload, path)
    page = Page(browser, path)
    assert not page.errors, page.errors
    return page


@pytest.fixture(scope="module")
def synthetic(browser, tmp_path_factory):
    payload = synthetic_payload(seed=3, n_layers=3, n_pos=10, max_features=5, fan_in=8)
    page = _open(browser, payload, tmp_path_factory.mktemp("explorer"), "synthetic")
    yield payload, page
    page.close()


@pytest.fixture(scope="module")
def mini(browser, tmp_path_factory):
    if not (MINI_DIR / "cfg.json").is_file():
        pytest.skip("the mini suite is not built (saes/mini/cfg.json)")
    from circuits.trace import trace
    from saes.suite import load_suite

    from circuits.explorer_data import explorer_payload

    circuit = trace(load_suite("mini"), DEMO_PROMPT, threshold=0.02, faithfulness=False, progress=False).circuit
    payload = explorer_payload(circuit)
    page = _open(browser, payload, tmp_path_factory.mktemp("explorer"), "mini")
    yield payload, page
    page.close()


@pytest.fixture(params=["synthetic", "mini"])
def case(request):
    return request.getfixturevalue(request.param)


def _shown_token(token: str) -> str:
    """A token as the page writes it: newlines and tabs made visible."""
    return token.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")


def _reset(page: Page, payload: dict) -> None:
    m = payload["meta"]
    page.js("([n, e]) => { explorer.select(null); explorer.unpin(explorer.pinned()); explorer.setSubgraph(false); "
            "explorer.setThresholds(n, e); }", [m["node_threshold"], m["edge_threshold"]])


# ------------------------------------------------------------------------------------ tests
def test_opens_pruned_offline(case):
    payload, page = case
    _reset(page, payload)
    visible = page.js("explorer.visibleNodes()")
    assert 0 < len(visible) < len(payload["nodes"]["id"])
    assert "target" in visible
    assert page.blocked == []
    text = page.path.read_text()
    assert not re.search(r"<script[^>]*\ssrc=|<link|<img|@import|url\(|(src|href)=[\"']?https?:", text, re.I)


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.995), (1.0, 1.0), (0.3, 0.6)])
def test_pruning_matches_circuit_tracer(case, thresholds):
    payload, page = case
    _reset(page, payload)
    page.js("([n, e]) => explorer.setThresholds(n, e)", list(thresholds))
    shown, kept_edges = reference_prune(payload, *thresholds)
    assert set(page.js("explorer.visibleNodes()")) == shown
    assert {tuple(e) for e in page.js("explorer.keptEdges()")} == kept_edges
    if thresholds == (0.8, 0.98):
        assert shown == {i for i, s in zip(payload["nodes"]["id"], payload["nodes"]["shown"]) if s}


def test_threshold_changes_count(case):
    payload, page = case
    _reset(page, payload)
    default = len(page.js("explorer.visibleNodes()"))
    low = page.js("explorer.setThresholds(0.3, 0.8)")["nodes"]
    high = page.js("explorer.setThresholds(0.99, 0.999)")["nodes"]
    assert low < default < high
    # the slider does the same as the API
    page.page.fill("#node-t", "0.5")
    page.page.dispatch_event("#node-t", "input")
    assert page.js("explorer.thresholds().node") == 0.5
    assert len(page.js("explorer.visibleNodes()")) == len(reference_prune(payload, 0.5, page.js("explorer.thresholds().edge"))[0])


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (1.0, 1.0)])
def test_no_two_nodes_overlap(case, thresholds):
    payload, page = case
    _reset(page, payload)
    page.js("([n, e]) => explorer.setThresholds(n, e)", list(thresholds))
    boxes = page.js("explorer.nodeBoxes()")
    assert len(boxes) == len(page.js("explorer.visibleNodes()")) > 1
    for i, a in enumerate(boxes):
        assert a["width"] > 0 and a["height"] > 0
        for b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
                       and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])
            assert not overlap, (a, b)


def test_click_feature_shows_card_and_its_edges(case):
    payload, page = case
    _reset(page, payload)
    nodes, edges = payload["nodes"], payload["edges"]
    visible = set(page.js("explorer.visibleNodes()"))
    feature = max((i for i, nid in enumerate(nodes["id"]) if nid in visible and nodes["kind"][i] in FEATURE_KINDS),
                  key=lambda i: abs(nodes["attribution"][i]))
    nid = nodes["id"][feature]
    page.page.hover(f'g.node[data-id="{nid}"]')
    tip = page.page.inner_text("#tooltip")
    assert nodes["label"][feature] in tip and "activation" in tip and "attribution to the target" in tip
    page.page.click(f'g.node[data-id="{nid}"]')
    assert page.js("explorer.selected()") == nid
    panel = page.js("explorer.panel()")
    card = payload["cards"].get(nodes["card"][feature] or "")
    if card:
        assert card["label"] in panel
        ctx = card["contexts"][0]
        assert _shown_token(ctx["tokens"][ctx["index"]]) in panel
        assert page.page.locator(".context .tok.hot").count() >= 1
    else:
        assert payload["meta"]["cards_note"] in panel
    assert nodes["label"][feature] in panel
    expected = {(nodes["id"][s], nodes["id"][d]) for s, d in zip(edges["src"], edges["dst"])
                if (nodes["id"][s] == nid and nodes["id"][d] in visible) or (nodes["id"][d] == nid and nodes["id"][s] in visible)}
    highlighted = page.js("explorer.highlightedEdges()")
    assert {(s, d) for s, d, _ in highlighted} == expected and len(highlighted) == len(expected) > 0
    # the panel lists the in-edges, then the out-edges, strongest first, with their weights
    shown_w = [float(t.replace("+", "")) for t in page.page.locator(".edges td:first-child").all_inner_texts()]
    ins = sorted((w for s, d, w in highlighted if d == nid), key=abs, reverse=True)[:40]
    outs = sorted((w for s, d, w in highlighted if s == nid), key=abs, reverse=True)[:40]
    assert shown_w == pytest.approx(ins + outs, rel=5e-3, abs=1e-12)
    if nodes["kind"][feature] == "attn_feature" and payload["heads"]["edge"]:
        assert "by head and source position" in panel
    page.page.keyboard.press("Escape")
    assert page.js("explorer.selected()") is None and page.js("explorer.highlightedEdges()") == []


def test_pin_and_supernode_give_qparams(case):
    payload, page = case
    _reset(page, payload)
    nodes = payload["nodes"]
    visible = page.js("explorer.visibleNodes()")
    a, b = [v for v in visible if nodes["kind"][nodes["id"].index(v)] in FEATURE_KINDS][:2]
    page.page.click(f'g.node[data-id="{a}"]', modifiers=["Shift"])
    page.js("ids => explorer.pin(ids)", [b])
    assert page.js("explorer.qParams().pinnedIds") == [a, b]
    q = page.js("ids => explorer.supernode('pair', ids)", [a, b])
    assert q == {"pinnedIds": [a, b], "supernodes": [["pair", a, b]], "linkType": "both", "clickedId": "", "sg_pos": ""}
    assert json.loads(page.page.input_value("#qparams")) == q
    page.js("explorer.setSubgraph(true)")
    assert sorted(page.js("explorer.visibleNodes()")) == sorted([a, b])
    page.js("explorer.setSubgraph(false)")
    page.js("ids => explorer.unpin(ids)", [a, b])
    assert page.js("explorer.qParams()")["pinnedIds"] == [] and page.js("explorer.qParams()")["supernodes"] == []


def test_search_and_special_nodes(synthetic):
    payload, page = synthetic
    _reset(page, payload)
    nodes = payload["nodes"]
    i = next(i for i, k in enumerate(nodes["kind"]) if k in FEATURE_KINDS)
    assert nodes["id"][i] in page.js("q => explorer.search(q)", nodes["label"][i].upper())
    assert "embed@0" in page.js("explorer.search('EMBED@')")
    page.js("explorer.select('attn0.error@0')")
    assert "does not reconstruct" in page.js("explorer.panel()")
    page.js("explorer.select('embed@1')")
    assert json.dumps(payload["tokens"][1], ensure_ascii=False) in page.js("explorer.panel()")
    # an attention feature: its in-edges split by source position and head, summing to the in-edge weights
    heads, edges = payload["heads"], payload["edges"]
    with_heads = {}
    for e, ws in zip(heads["edge"], heads["weights"]):
        with_heads.setdefault(edges["dst"][e], []).append((e, ws))
    d = max(with_heads, key=lambda i: len(with_heads[i]))
    page.js("id => explorer.select(id)", nodes["id"][d])
    cells = page.page.locator(".heads table.grid td").all_inner_texts()
    assert sum(float(c) for c in cells) == pytest.approx(sum(edges["weight"][e] for e, _ in with_heads[d]), rel=2e-2, abs=1e-3)
    visible = set(page.js("explorer.visibleNodes()"))
    listed = [e for e, _ in with_heads[d] if nodes["id"][edges["src"][e]] in visible]
    assert page.page.locator(".edges .hsplit").count() == min(40, len(listed))
    page.js("explorer.select('target')")
    panel = page.js("explorer.panel()")
    assert "query marginal" in panel and "key marginal" in panel
    page.js("explorer.select(null)")


@pytest.mark.slow
def test_large_graph_is_responsive(browser, tmp_path):
    payload = synthetic_payload(seed=1, n_layers=6, n_pos=40, max_features=7, fan_in=66, cards=False)
    n_nodes, n_edges = len(payload["nodes"]["id"]), len(payload["edges"]["src"])
    assert n_nodes >= 2000 and n_edges >= 100_000
    page = _open(browser, payload, tmp_path, "large")
    try:
        t = time.perf_counter()
        page.js("explorer.setThresholds(0.6, 0.95)")
        change_s = time.perf_counter() - t
        timings = page.js("explorer.timings()")
        log.info("explorer on %d nodes, %d edges: open %.2f s (script %.0f ms), threshold change %.0f ms (script %.0f ms)",
                 n_nodes, n_edges, page.open_s, timings["open_ms"], 1000 * change_s, timings["threshold_ms"])
        shown, _ = reference_prune(payload, 0.6, 0.95)
        assert set(page.js("explorer.visibleNodes()")) == shown
        assert change_s < 2.0 and page.open_s < 15.0
    finally:
        page.close()


def test_text_that_closes_a_script_stays_data(browser, tmp_path):
    payload = synthetic_payload(seed=2, n_layers=1, n_pos=4)
    payload["tokens"][0] = "</script><!-- & <b>"
    payload["nodes"]["label"][1] = "</SCRIPT>"
    page = _open(browser, payload, tmp_path, "escaped")
    try:
        assert page.js("JSON.parse(document.getElementById('circuit-data').textContent).tokens[0]") == payload["tokens"][0]
        assert page.js("explorer.search('</script>')") == [payload["nodes"]["id"][1]]
        page.js("id => explorer.select(id)", payload["nodes"]["id"][1])
        assert "</SCRIPT>" in page.js("explorer.panel()")
    finally:
        page.close()


def test_bad_payload_is_refused_before_writing(tmp_path):
    payload = synthetic_payload(seed=2, n_layers=1, n_pos=4)
    payload["edges"]["weight"] = payload["edges"]["weight"][:-1]
    with pytest.raises(ValueError, match="edges.weight"):
        write_explorer(payload, tmp_path / "graph.html")
    with pytest.raises(ValueError, match="schema 1"):
        write_explorer({"nodes": {}}, tmp_path / "graph.html")
    assert list(tmp_path.iterdir()) == []
