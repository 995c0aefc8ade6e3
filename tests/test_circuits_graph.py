"""Circuit export (node-link JSON, GraphML, attribution-graph JSON), influence scores and pruning,
faithfulness by ablation and the command line (the explorer page has tests/test_explorer.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import math
import shutil
from pathlib import Path

import networkx as nx
import pytest
import torch

from circuits.faithfulness import Ablation, ablation_keeping, run_spliced
from circuits import sites
from circuits.explorer_data import explorer_payload
from circuits.graph import (Circuit, attribution_graph_json, read_node_link, write_attribution_graph, write_graphml,
                            write_node_link)
from circuits.influence import graph_scores, influence, prune
from circuits.trace import trace
from saes.io import atomic_save_tensors, save_dictionary, save_model
from saes.testing import make_suite

PROMPT = "import os\nfor i in range(3):"
NODE_KINDS = set(sites.KINDS)


@pytest.fixture(scope="module")
def suite():
    return make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=5)


@pytest.fixture(scope="module")
def traced(suite):
    return trace(suite, PROMPT, None, threshold=0.02, progress=False)


def test_node_link_json_has_the_documented_attributes(traced, tmp_path):
    c = traced.circuit
    for full in (False, True):
        write_node_link(c, tmp_path / "graph.json", full=full)
        g = read_node_link(tmp_path / "graph.json")
        view = c if full else c.shown_view()
        for key in ("model", "prompt", "tokens", "target", "max_relative_residual"):
            assert key in g.graph
        assert g.graph["prompt"] == PROMPT and g.graph["target"] == c.target and len(g.graph["tokens"]) == len(c.tokens)
        assert g.graph["max_relative_residual"] <= 1e-9
        assert g.number_of_nodes() == view.n_nodes and g.number_of_edges() == view.n_edges
        assert (g.number_of_edges() == c.n_edges) == full and c.n_edges > c.shown_view().n_edges
        kinds = set()
        for _, n in g.nodes(data=True):
            for key in ("kind", "layer", "pos", "feature", "activation", "attribution", "influence", "constant", "remainder", "shown"):
                assert key in n
            kinds.add(n["kind"])
        assert kinds <= NODE_KINDS and {"target", "attn_feature", "embed"} <= kinds
        assert g.nodes["target"]["activation"] == pytest.approx(c.target_value)
        n_ov = 0
        for u, v, e in g.edges(data=True):
            assert "weight" in e and e["shown"] in (True, False)
            if g.nodes[v]["kind"] == "attn_feature":
                n_ov += 1
                assert math.fsum(e["head_weights"]) == pytest.approx(e["weight"], abs=1e-9)
                assert e["src_pos"] == g.nodes[u]["pos"] and 0 <= e["head"] < len(e["head_weights"])
        assert n_ov > 0
        # completeness read back from the file alone: the shown view moved its hidden in-edges into remainders
        for nid, n in g.nodes(data=True):
            if n["kind"] in ("mlp_feature", "attn_feature", "target"):
                total = sum(e["weight"] for _, _, e in g.in_edges(nid, data=True)) + n["constant"] + n["remainder"]
                assert total == pytest.approx(n["activation"], abs=1e-8 * max(1, abs(n["activation"])))


def test_graphml_and_attribution_graph_files(traced, tmp_path):
    c = traced.circuit
    write_graphml(c, tmp_path / "graph.graphml")
    g = nx.read_graphml(tmp_path / "graph.graphml")
    assert g.number_of_nodes() == int(c.node_shown.sum()) and g.number_of_edges() == int(c.edge_shown.sum())
    assert json.loads(g.graph["tokens"]) == c.tokens
    write_graphml(c, tmp_path / "full.graphml", full=True)
    assert nx.read_graphml(tmp_path / "full.graphml").number_of_edges() == c.n_edges
    write_attribution_graph(c, tmp_path / "ag.json", full=True)
    ag = json.loads((tmp_path / "ag.json").read_text())
    assert set(ag) == {"metadata", "qParams", "nodes", "links"}
    assert ag["metadata"]["prompt_tokens"] == c.tokens and ag["metadata"]["schema_version"] == 1
    ids = [n["node_id"] for n in ag["nodes"]]
    assert len(set(ids)) == len(ids), "node ids must be unique (attention and MLP features share indices)"
    assert all(l["source"] in ids and l["target"] in ids for l in ag["links"]) and len(ag["links"]) == c.n_edges
    assert attribution_graph_json(c, full=True)["nodes"] == ag["nodes"]
    assert len(attribution_graph_json(c)["links"]) == int(c.edge_shown.sum()), "the shown view by default"


NEURONPEDIA_TYPES = {"embedding", "cross layer transcoder", "mlp reconstruction error", "lorsa", "lorsa error", "logit"}


@pytest.mark.parametrize("spec", [None, "attn1:{f}@-1", 'logit:#5-#7', "attn1.1:8->3"])
def test_attribution_graph_conforms_to_circuit_tracer_models(suite, spec, tmp_path):
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    if spec and "{f}" in spec:
        from circuits.linear_model import LinearisedModel

        lm = LinearisedModel(suite, suite.tokens(PROMPT))
        group = lm.feature_group("attn_feature", 1)
        spec = spec.format(f=int(group.feature[-1, int(group.activation[-1].argmax())]))
    t = trace(suite, PROMPT, spec, threshold=0.02, progress=False, faithfulness=False)
    c = t.circuit
    labels = {nid: f"label of {nid}" for nid in c.ids if ":" in nid}
    write_attribution_graph(c, tmp_path / "ag.json", labels=labels, full=True)
    data = json.loads((tmp_path / "ag.json").read_text())
    model = graph_models.Model(**data)
    for link in data["links"]:
        graph_models.Link(**link)
    assert {n.feature_type for n in model.nodes} <= NEURONPEDIA_TYPES
    by_id = {n["node_id"]: n for n in data["nodes"]}
    tokens = c.token_ids
    for i, nid in enumerate(c.ids):
        kind, pos = c.node(i).kind, c.node(i).pos
        if kind == "embed":
            assert f"E_{tokens[pos]}_{pos}" in by_id, "embedding ids carry the token id, then the position"
    target = data["nodes"][0]
    assert target["clerp"].startswith(f"target: {c.target}")
    if c.target_info.kind in ("logit", "attention_score"):
        assert target["feature_type"] == "logit" and target["is_target_logit"] and target["layer"] == str(c.n_layers + 1)
    else:
        assert target["feature_type"] == ("lorsa" if c.target_info.kind == "attn_feature" else "cross layer transcoder")
    feature_nodes = [n for n in data["nodes"][1:] if n["feature_type"] in ("lorsa", "cross layer transcoder")]
    assert feature_nodes and all(n["clerp"].startswith("label of ") for n in feature_nodes)


@pytest.mark.parametrize("selection", ["mlp", "attn,mlp1", "all+clt"])
def test_attribution_graph_of_partial_and_clt_suites_conforms_to_circuit_tracer_models(suite, selection, tmp_path):
    """Transcoders only (attention passed through), a layer without a transcoder (its MLP output nodes) and a
    cross-layer transcoder: the export validates and keeps every node and edge of the circuit."""
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    from test_circuits_identities import with_clt

    spec, _, extra = selection.partition("+")
    part = with_clt(suite.select(spec)) if extra else suite.select(spec)
    c = trace(part, PROMPT, 'logit:#5-#7', threshold=0.02, progress=False, faithfulness=False).circuit
    write_attribution_graph(c, tmp_path / "ag.json", labels={nid: f"label of {nid}" for nid in c.ids if ":" in nid}, full=True)
    data = json.loads((tmp_path / "ag.json").read_text())
    model = graph_models.Model(**data)
    for link in data["links"]:
        graph_models.Link(**link)
    assert len(model.nodes) == c.n_nodes and len(data["links"]) == c.n_edges
    assert {n.feature_type for n in model.nodes} <= NEURONPEDIA_TYPES
    kinds = set(c.counts())
    assert ("mlp_output" in kinds) == (selection == "attn,mlp1")
    assert "mlp_feature" in kinds and ("attn_feature" in kinds) == (selection != "mlp")
    payload = explorer_payload(c)
    json.dumps(payload)
    assert len(payload["nodes"]["id"]) == c.n_nodes


def test_influence_agrees_with_circuit_tracer_on_the_dense_matrix(suite):
    ct_graph = pytest.importorskip("circuit_tracer.graph")
    c = trace(suite, "import os", "logit:#5-#7", threshold=0.0, progress=False, faithfulness=False, prune=None).circuit
    assert float(c.node_remainder.abs().max()) == 0.0
    A = torch.zeros(c.n_nodes, c.n_nodes, dtype=torch.float64)
    A.index_put_((c.edge_dst, c.edge_src), c.edge_weight.double(), accumulate=True)
    e0 = torch.zeros(c.n_nodes, dtype=torch.float64)
    e0[0] = 1.0
    reference = ct_graph.compute_node_influence(A, e0)
    assert torch.allclose(influence(c), reference, rtol=1e-10, atol=1e-14)
    assert torch.allclose(c.node_influence.double(), reference, rtol=1e-10, atol=1e-14)


def test_scores_and_pruning_keep_the_identity(traced):
    c = traced.circuit
    scores = graph_scores(c)
    assert 0 < scores["replacement"] < 1 and 0 < scores["completeness"] <= 1
    assert scores["replacement"] == pytest.approx(c.scores["replacement"]) and "shown_replacement" in c.scores
    infl = influence(c)
    assert infl[0] == 0 and bool((infl >= 0).all())
    p = prune(c, 0.5, 0.9)
    assert p.nodes[0] and int(p.nodes.sum()) < c.n_nodes and int(p.edges.sum()) < c.n_edges
    src, dst = c.edge_src[p.edges], c.edge_dst[p.edges]
    assert bool(p.nodes[src].all() and p.nodes[dst].all())
    has_out = torch.zeros(c.n_nodes, dtype=torch.bool)
    has_out[src] = True
    has_in = torch.zeros(c.n_nodes, dtype=torch.bool)
    has_in[dst] = True
    others = p.nodes.clone()
    others[0] = False
    assert bool(has_out[others].all()), "every shown node but the target has a shown out-edge"
    assert bool(has_in[p.nodes & c.kind_mask("attn_feature", "mlp_feature")].all()), "every shown feature has a shown in-edge"
    wider = prune(c, 0.9, 0.99)
    assert int(wider.nodes.sum()) >= int(p.nodes.sum())
    small = c.restricted(p.nodes, p.edges)
    assert float(small.completeness_residuals().max()) <= 1e-9
    assert float(c.shown_view().completeness_residuals().max()) <= 1e-9
    with pytest.raises(ValueError, match="node_threshold must be in"):
        prune(c, 0.0, 0.9)


def test_circuit_save_and_load_round_trip(traced, tmp_path):
    c = traced.circuit
    c.save(tmp_path)
    d = Circuit.load(tmp_path)
    for name in c.__dataclass_fields__:
        a, b = getattr(c, name), getattr(d, name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        else:
            assert a == b, name
    assert d.ids == c.ids and d.nodes() == c.nodes() and d.edges() == c.edges()
    meta = json.loads((tmp_path / "graph_meta.json").read_text())
    meta["node_ids"][1] = "mlp0:1@0"
    (tmp_path / "graph_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        Circuit.load(tmp_path)


def test_node_and_edge_views(traced):
    c = traced.circuit
    n = c.node("target")
    assert n.index == 0 and n.kind == "target" and n.activation == c.target_value and c.node(0) == n
    views = c.nodes()
    assert [v.id for v in views] == c.ids and all(c.node(v.id) == v for v in views[:20])
    edges = c.edges()
    assert len(edges) == c.n_edges and len(c.edges(shown_only=True)) == int(c.edge_shown.sum())
    heads = [e for e in edges if e.head_weights is not None]
    assert heads and all(c.node(e.target).kind == "attn_feature" for e in heads)
    assert all(math.fsum(e.head_weights) == pytest.approx(e.weight, abs=1e-9) for e in heads)
    with pytest.raises(KeyError, match="not a node"):
        c.node("mlp0:99999@0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.activation = 0.0


def test_sites_name_every_node_kind_one_way():
    for kind, layer, pos, feature in [("embed", -1, 3, -1), ("pos_embed", -1, 0, -1), ("attn_feature", 2, 5, 17),
                                      ("attn_error", 2, 5, -1), ("mlp_feature", 1, 5, 613), ("mlp_error", 1, 5, -1),
                                      ("mlp_output", 3, 7, -1)]:
        text = sites.format_node_id(kind, layer, pos, feature)
        assert sites.parse_node_id(text) == (kind, layer, pos, feature)
    assert sites.format_node_id("mlp_feature", 1, 5, 613) == "mlp1:613@5"
    assert sites.format_node_id("attn_error", 2, 5) == "attn2.error@5" and sites.format_node_id("mlp_output", 1, 4) == "mlp1.out@4"
    s = sites.site("mlp3")
    assert (s.input_hook, s.output_hook, s.feature_kind, s.stage) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out", "mlp_feature", 8)
    a = sites.site_of("attn_error", 3)
    assert a.name == "attn3" and a.input_hook == a.output_hook == "blocks.3.attn.hook_z" and a.stage == 7
    assert sites.row_names(2) == ["embeddings", "attn0", "mlp0", "attn1", "mlp1", "target"]
    assert sites.row_of("target", 0, 2) == 5 and sites.row_of("embed", -1, 2) == 0
    labels = {"mlp1:613": "by feature", "mlp1:613@7": "by node", "embed@2": "token"}
    assert sites.label_for(labels, "mlp1:613@7") == "by node" and sites.label_for(labels, "mlp1:613@3") == "by feature"
    assert sites.label_for(labels, "embed@2") == "token" and sites.label_for(labels, "mlp1.error@3") is None
    with pytest.raises(ValueError, match="not a node id"):
        sites.parse_node_id("mlp1:x@2")
    with pytest.raises(ValueError, match="not a dictionary name"):
        sites.site("transcoder3")


def test_explorer_payload_columns(suite, tmp_path):
    t = trace(suite, PROMPT, "attn1.1:8->3", threshold=0.02, progress=False, faithfulness=False)
    c = t.circuit
    cards = {"attn0:1": {"title": "attn0:1", "label": "x"}}
    p = explorer_payload(c, cards=cards, labels={c.ids[1]: "first"}, max_edges=50)
    p = json.loads(json.dumps(p, allow_nan=False))  # JSON as the page's JSON.parse reads it
    assert p["schema"] == 1 and p["rows"] == ["embeddings", "attn0", "mlp0", "attn1", "mlp1", "target"]
    nodes, edges, heads = p["nodes"], p["edges"], p["heads"]
    n = len(nodes["id"])
    assert n == c.n_nodes and all(len(v) == n for v in nodes.values())
    assert nodes["id"][0] == "target" and nodes["kind"][0] == "target" and nodes["row"][0] == len(p["rows"]) - 1
    assert nodes["id"] == c.ids and len(set(nodes["id"])) == n and nodes["label"][1] == "first"
    assert nodes["attribution"] == c.node_attribution.tolist() and nodes["influence"] == c.node_influence.tolist()
    assert nodes["shown"] == c.node_shown.tolist()
    for i in range(n):
        kind, row, layer = nodes["kind"][i], nodes["row"][i], nodes["layer"][i]
        if kind in ("embed", "pos_embed"):
            assert p["rows"][row] == "embeddings"
        elif kind != "target":
            assert p["rows"][row] == sites.dictionary_name(kind, layer)
        key = f"{sites.dictionary_name(kind, layer)}:{nodes['feature'][i]}" if kind.endswith("_feature") else None
        assert nodes["card"][i] == (key if key in cards else None)
    m = len(edges["src"])
    assert m == 50 < c.n_edges and p["meta"]["n_edges_total"] == c.n_edges and all(len(v) == m for v in edges.values())
    assert sum(edges["shown"]) == min(50, int(c.edge_shown.sum()))
    assert all(0 <= s < n and 0 <= d < n for s, d in zip(edges["src"], edges["dst"]))
    assert len(heads["edge"]) == len(heads["weights"]) == len(heads["src_pos"])
    for e, w, sp in zip(heads["edge"], heads["weights"], heads["src_pos"]):
        assert nodes["kind"][edges["dst"][e]] == "attn_feature" and sp == nodes["pos"][edges["src"][e]]
        assert len(w) == c.n_heads and math.fsum(w) == pytest.approx(edges["weight"][e], abs=1e-9)
    qk = p["qk"]
    pairs = torch.tensor(qk["pairs"], dtype=torch.float64)
    assert pairs.shape == (len(qk["query_nodes"]), len(qk["key_nodes"])) and qk["query_nodes"][-1] == "constant"
    assert qk["query_marginal"] == pytest.approx(pairs.sum(1).tolist()) and qk["key_marginal"] == pytest.approx(pairs.sum(0).tolist())
    assert sum(qk["query_marginal"]) == pytest.approx(qk["score"], rel=1e-9)
    meta = p["meta"]
    assert meta["node_threshold"] == 0.8 and meta["edge_threshold"] == 0.98 and meta["n_heads"] == c.n_heads
    assert meta["cards_note"] is None and explorer_payload(c)["meta"]["cards_note"]
    assert set(p["cards"]) == set(cards)


def test_faithfulness_curve_ends_at_one_for_the_full_graph(suite):
    full = trace(suite, "import os", "logit:#5-#7", threshold=0.0, progress=False)
    curve = full.circuit.faithfulness
    assert curve[0]["n_nodes"] == 0 and curve[0]["faithfulness"] == pytest.approx(0.0, abs=1e-12)
    assert curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-9), "every active node kept = the model itself"
    assert curve[0]["completeness"] == pytest.approx(1.0, abs=1e-9), "ablating nothing leaves the model"
    assert [r["n_nodes"] for r in curve] == sorted(r["n_nodes"] for r in curve)
    lm, target = full.model, full.target
    assert abs(run_spliced(lm, target, Ablation({}, {})) - run_spliced(lm, target, ablation_keeping(lm, []))) > 1e-3
    assert run_spliced(lm, target, Ablation({}, {})) == pytest.approx(target.clean_value(lm), abs=1e-10)


def save_suite(suite, directory: Path) -> Path:
    """Write a tiny suite in the mini layout so that ``--suite-dir`` can load it."""
    from saes import testing

    tok_dir = testing._TOKENIZER_DIRS[len(suite.model.tokenizer)]
    shutil.copytree(tok_dir, directory / "tokenizer")
    save_model(suite.model, directory)
    # the causal-mask buffers (-inf) are rebuilt at load time; the loader refuses non-finite tensors
    state = {k: v for k, v in suite.model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))}
    atomic_save_tensors(state, directory / "model.safetensors")
    for layer in range(suite.n_layers):
        save_dictionary(suite.attn_saes[layer], directory / "dictionaries" / f"attn{layer}")
        save_dictionary(suite.transcoders[layer], directory / "dictionaries" / f"mlp{layer}")
    return directory


def test_cli_trace_writes_every_file(tmp_path, capsys):
    from scripts.cli import main

    suite = make_suite(n_layers=2, d_sae=32, seed=7)
    save_suite(suite, tmp_path / "suite")
    out = tmp_path / "out"
    rc = main(["trace", "--model", "mini", "--suite-dir", str(tmp_path / "suite"), "--device", "cpu", "--prompt", PROMPT,
               "--threshold", "0.05", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "largest relative residual" in text and "attn_feature" in text and "faithfulness" in text
    for name in ("graph.safetensors", "graph_meta.json", "graph.json", "graph.graphml", "attribution_graph.json", "graph.html",
                 "summary.json"):
        assert (out / name).stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    g = read_node_link(out / "graph.json")
    assert g.graph["target"].startswith("mlp1:") and g.graph["max_relative_residual"] <= 1e-4
    c = Circuit.load(out)
    summary = json.loads((out / "summary.json").read_text())
    assert g.number_of_nodes() == int(c.node_shown.sum()) == summary["n_shown_nodes"] < c.n_nodes == summary["n_nodes"]
    assert summary["pruning"] == {"node_threshold": 0.8, "edge_threshold": 0.98} and "shown_replacement" in summary["scores"]
    assert any(r["shown"] for r in summary["faithfulness"])
    assert set(summary["cards"]) == {"n_cards", "note"}
    page = (out / "graph.html").read_text()
    assert 'id="circuit-data"' in page, "graph.html is the explorer page"
    # an --out that cannot be made: one clear line before any work, nothing written
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["trace", "--model", "mini", "--suite-dir", str(tmp_path / "suite"), "--device", "cpu", "--prompt", PROMPT,
               "--no-progress", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "out", "suite"]
    rc = main(["trace", "--model", "mini", "--suite-dir", str(tmp_path / "suite"), "--device", "cpu", "--prompt", PROMPT,
               "--target", "mlp1:999", "--out", str(out)])
    assert rc == 2 and "out of range" in capsys.readouterr().err
