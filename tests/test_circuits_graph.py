"""Circuit export (node-link JSON, GraphML, attribution-graph JSON), influence scores and pruning,
faithfulness by ablation, the command line, and the viewer rendered in headless Chromium."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import networkx as nx
import pytest
import torch

from circuits.faithfulness import Ablation, ablation_keeping, run_spliced
from circuits.graph import attribution_graph_json, read_node_link, write_attribution_graph, write_graphml, write_node_link
from circuits.influence import graph_scores, node_influence, prune_by_influence
from circuits.trace import trace
from circuits.viewer import write_html
from saes.io import atomic_save_tensors, save_dictionary, save_model
from saes.testing import make_suite

PROMPT = "import os\nfor i in range(3):"
NODE_KINDS = {"embed", "pos_embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error", "target"}


@pytest.fixture(scope="module")
def suite():
    return make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=5)


@pytest.fixture(scope="module")
def traced(suite):
    return trace(suite, PROMPT, None, threshold=0.02, progress=False)


def test_node_link_json_has_the_documented_attributes(traced, tmp_path):
    c = traced.circuit
    write_node_link(c, tmp_path / "graph.json")
    g = read_node_link(tmp_path / "graph.json")
    for key in ("model", "prompt", "tokens", "target", "max_relative_residual"):
        assert key in g.graph
    assert g.graph["prompt"] == PROMPT and g.graph["target"] == c.target and len(g.graph["tokens"]) == len(c.tokens)
    assert g.graph["max_relative_residual"] <= 1e-9
    assert g.number_of_nodes() == len(c.nodes) and g.number_of_edges() == len(c.edges)
    kinds = set()
    for _, n in g.nodes(data=True):
        for key in ("kind", "layer", "pos", "feature", "activation", "constant", "remainder"):
            assert key in n
        kinds.add(n["kind"])
    assert kinds <= NODE_KINDS and {"target", "mlp_feature", "attn_feature", "embed"} <= kinds
    assert g.nodes["target"]["activation"] == pytest.approx(c.target_value)
    n_ov = 0
    for u, v, e in g.edges(data=True):
        assert "weight" in e
        if g.nodes[v]["kind"] == "attn_feature":
            n_ov += 1
            assert math.fsum(e["head_weights"]) == pytest.approx(e["weight"], abs=1e-9)
            assert e["src_pos"] == g.nodes[u]["pos"] and 0 <= e["head"] < len(e["head_weights"])
    assert n_ov > 0
    # completeness read back from the file alone
    for nid, n in g.nodes(data=True):
        if n["kind"] in ("mlp_feature", "attn_feature", "target"):
            total = sum(e["weight"] for _, _, e in g.in_edges(nid, data=True)) + n["constant"] + n["remainder"]
            assert total == pytest.approx(n["activation"], abs=1e-8 * max(1, abs(n["activation"])))


def test_graphml_and_attribution_graph_files(traced, tmp_path):
    c = traced.circuit
    write_graphml(c, tmp_path / "graph.graphml")
    g = nx.read_graphml(tmp_path / "graph.graphml")
    assert g.number_of_nodes() == len(c.nodes) and g.number_of_edges() == len(c.edges)
    assert json.loads(g.graph["tokens"]) == c.tokens
    write_attribution_graph(c, tmp_path / "ag.json")
    ag = json.loads((tmp_path / "ag.json").read_text())
    assert set(ag) == {"metadata", "qParams", "nodes", "links"}
    assert ag["metadata"]["prompt_tokens"] == c.tokens and ag["metadata"]["schema_version"] == 1
    ids = [n["node_id"] for n in ag["nodes"]]
    assert len(set(ids)) == len(ids), "node ids must be unique (attention and MLP features share indices)"
    for n in ag["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "influence", "activation"} <= set(n)
        assert isinstance(n["layer"], str)
    assert all(l["source"] in ids and l["target"] in ids for l in ag["links"]) and len(ag["links"]) == len(c.edges)
    assert attribution_graph_json(c)["nodes"] == ag["nodes"]


def test_scores_and_pruning_keep_the_identity(traced):
    c = traced.circuit
    scores = graph_scores(c)
    assert 0 < scores["replacement"] < 1 and 0 < scores["completeness"] <= 1
    infl = node_influence(c)
    assert infl["target"] == 0 and all(v >= 0 for v in infl.values())
    small = prune_by_influence(c, 0.5, 0.9)
    assert len(small.nodes) < len(c.nodes) and len(small.edges) < len(c.edges)
    assert max(small.completeness_residuals().values()) <= 1e-9
    assert {n["kind"] for n in small.nodes} >= {"target", "embed"}
    with pytest.raises(ValueError, match="node_threshold must be in"):
        prune_by_influence(c, 0.0, 0.9)


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
    for name in ("graph.json", "graph.graphml", "attribution_graph.json", "graph.html", "summary.json"):
        assert (out / name).stat().st_size > 0
    g = read_node_link(out / "graph.json")
    assert g.graph["target"].startswith("mlp1:") and g.graph["max_relative_residual"] <= 1e-4
    assert "plotly" in (out / "graph.html").read_text()[:20000].lower()
    rc = main(["trace", "--model", "mini", "--suite-dir", str(tmp_path / "suite"), "--device", "cpu", "--prompt", PROMPT,
               "--target", "mlp1:999", "--out", str(out)])
    assert rc == 2 and "out of range" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- viewer
def png_pixels(path: Path):
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of (r, g, b)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * channels : x * channels + 3]) for x in range(width)])
        prev = line
    return rows


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_viewer_renders_the_graph_in_headless_chromium(traced, tmp_path):
    html = tmp_path / "graph.html"
    write_html(traced.circuit, html)
    assert "https://cdn" not in html.read_text()[:2000], "plotly.js must be inlined"
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1000,700",
             "--virtual-time-budget=5000", f"--screenshot={shot}", html.as_uri()],
            check=True, timeout=120, capture_output=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    pixels = png_pixels(shot)
    flat = [p for row in pixels for p in row]

    def near(colour, tol=40):
        return sum(1 for p in flat if all(abs(p[i] - colour[i]) <= tol for i in range(3)))

    # node markers by kind colour, and both edge colours
    assert near((44, 160, 44)) > 50, "no MLP-feature markers drawn"
    assert near((255, 127, 14)) > 50, "no attention-feature markers drawn"
    assert near((148, 103, 189)) > 20, "no target marker drawn"
    edge_pixels = near((31, 119, 180), 60) + near((214, 39, 40), 60)
    assert edge_pixels > 200, "no edges drawn"
    assert sum(1 for p in flat if p != (255, 255, 255)) > 0.02 * len(flat)
