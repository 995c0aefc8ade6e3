"""Dashboards: the one-pass path gives sae-vis's own numbers; pages are self-contained; they render in headless
Chromium with no network, panels drawn (checked from the DOM and from a screenshot)."""

import re
import shutil
import subprocess

import pytest
import torch

from analysis import sae_vis_adapter as adapter
from analysis.dashboards import build_dictionary_dashboards, vis_config, write_feature_dashboards, write_prompt_dashboard
from dashboard_fixtures import PLANTED_FEATURE, planted_suite, tiny_tokens


@pytest.fixture(scope="module")
def planted():
    suite, cls, members = planted_suite()
    return suite, cls, tiny_tokens(suite)


@pytest.fixture(scope="module")
def pages(planted, tmp_path_factory):
    suite, cls, tokens = planted
    out = tmp_path_factory.mktemp("dash")
    paths = write_feature_dashboards(suite, {"mlp0": [PLANTED_FEATURE, 2], "attn1": [3]}, out, tokens=tokens,
                                     token_classes={("mlp0", PLANTED_FEATURE): cls})
    prompt = write_prompt_dashboard(suite, "mlp0", "import os\nfor i in range(3):\n    print(i)", out / "prompt.html", tokens=tokens, max_features=8)
    return out, paths, prompt


@pytest.mark.parametrize("dictionary", ["attn0", "mlp0"])
def test_one_pass_equals_plain_sae_vis(planted, dictionary):
    """The one-pass path (acts once, DFA rows recomputed on demand) gives the data of sae-vis's own
    ``SaeVisData.create`` on sae-lens's HookedSAETransformer (quantile groups are sampled; the rest must agree)."""
    from sae_vis.data_storing_fns import SaeVisData

    suite, cls, tokens = planted
    feats = [1, PLANTED_FEATURE, 7]
    view = adapter.vis_view(suite.dictionary(dictionary), n_ctx=tokens.rows.shape[1])
    plain = SaeVisData.create(sae=view, model=adapter.hooked_sae_transformer(suite.model), tokens=tokens.rows,
                              cfg=vis_config(feats), vocab_dict=adapter.vocab_dict(suite.model.tokenizer))
    fast = build_dictionary_dashboards(suite, dictionary, feats, tokens, with_scorecards=False).vis_data
    for f in feats:
        p, q = plain.feature_data_dict[f], fast.feature_data_dict[f]
        assert p["actsHistogram"] == q["actsHistogram"] and p["logitsTable"] == q["logitsTable"]
        assert p["featureTables"].correlated_features_indices == q["featureTables"].correlated_features_indices
        assert p["featureTables"].correlated_features_pearson == pytest.approx(q["featureTables"].correlated_features_pearson, abs=1e-3)
        top_p, top_q = p["seqMultiGroup"].seq_group_data[0], q["seqMultiGroup"].seq_group_data[0]
        assert top_p.title == top_q.title and len(top_p.seq_data) == len(top_q.seq_data) > 0
        for a, b in zip(top_p.seq_data, top_q.seq_data):
            assert a.token_ids == b.token_ids
            assert a.feat_acts == pytest.approx(b.feat_acts, abs=1e-4)
            assert a.loss_contribution == pytest.approx(b.loss_contribution, abs=1e-4)
            assert a.dfa_values == pytest.approx(b.dfa_values, abs=1e-5)  # attention SAEs: DFA from recomputed rows
        if dictionary.startswith("attn"):
            assert any(sd.dfa_values for sd in top_q.seq_data)


def test_pages_are_self_contained(pages):
    out, paths, prompt = pages
    assert paths == {("mlp0", PLANTED_FEATURE): f"mlp0_f{PLANTED_FEATURE}.html", ("mlp0", 2): "mlp0_f2.html", ("attn1", 3): "attn1_f3.html"}
    for rel in [*paths.values(), prompt.name]:
        page = (out / rel).read_text()
        assert not re.search(r"<script[^>]*\bsrc=", page)
        assert "http://" not in re.sub(r"<script>.*?</script>", "", page, flags=re.S).replace("http://www.w3.org", "")
        assert "d3-6.7.0.min.js, inlined" in page and "plotly-basic-1.58.5.min.js, inlined" in page
    planted_page = (out / paths[("mlp0", PLANTED_FEATURE)]).read_text()
    assert "class='scorecard'" in planted_page and ">1.000<" in planted_page  # the planted detector's 1.0 / 1.0
    assert (out / f"mlp0_f{PLANTED_FEATURE}.scorecard.json").is_file()


def test_dashboard_input_errors(planted, tmp_path):
    suite, cls, tokens = planted
    with pytest.raises(ValueError, match="no features requested"):
        write_feature_dashboards(suite, {}, tmp_path, tokens=tokens)
    with pytest.raises(IndexError, match="feature index 99 is out of range for attn0"):
        write_feature_dashboards(suite, {"attn0": [1, 99]}, tmp_path, tokens=tokens)
    with pytest.raises(KeyError, match="no dictionary 'attn5'"):
        write_feature_dashboards(suite, {"attn5": [1]}, tmp_path, tokens=tokens)
    assert not list(tmp_path.iterdir())  # refused before writing anything


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND",  # no network at all
]


def _chromium(args, tmp_path):
    exe = shutil.which("chromium")
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    res = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)
    return res


def render(page, tmp_path, size=(1600, 1000)):
    """(DOM after scripts ran, screenshot path) of a page opened from disk with no network."""
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp_path).stdout
    png = tmp_path / (page.stem + ".png")
    _chromium([f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000", page.as_uri()], tmp_path)
    return dom, png


def pixel_counts(png):
    from PIL import Image

    img = Image.open(png).convert("RGB")
    px = torch.tensor(list(img.getdata()), dtype=torch.int32)
    r, g, b = px.unbind(-1)
    return {
        "non_white": int(((r < 235) | (g < 235) | (b < 235)).sum()),
        "orange": int(((r > 220) & (g > 110) & (g < 200) & (b < 120)).sum()),  # activation histogram bars
        "blue": int(((b > 180) & (r < 170) & (g < 170)).sum()),  # positive-logit bars and table cells
        "red": int(((r > 200) & (g < 150) & (b < 150)).sum()),  # negative-logit bars and table cells
        "total": px.shape[0],
    }


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_feature_page_renders_with_panels(pages, tmp_path):
    out, paths, _ = pages
    dom, png = render(out / paths[("mlp0", PLANTED_FEATURE)], tmp_path)
    # Plotly drew both histograms; d3 drew the tables and the example sequences.
    assert dom.count("class=\"main-svg\"") >= 2, dom[:2000]
    assert dom.count("<tr") > 20
    assert "TOP ACTIVATIONS" in dom and "NEGATIVE LOGITS" in dom and "Scorecard" in dom
    counts = pixel_counts(png)
    assert counts["non_white"] > 0.02 * counts["total"]
    assert counts["orange"] > 300 and counts["blue"] > 200 and counts["red"] > 200, counts


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_prompt_page_renders_with_panels(pages, tmp_path):
    out, _, prompt = pages
    dom, png = render(prompt, tmp_path, size=(900, 1200))
    assert "select-0" in dom  # the metric / token dropdowns
    assert dom.count("class=\"main-svg\"") >= 1
    counts = pixel_counts(png)
    assert counts["non_white"] > 0.02 * counts["total"] and counts["orange"] > 100, counts


def test_circuit_nodes_link_to_their_dashboards(planted, tmp_path):
    from analysis.dashboards import circuit_feature_requests, write_circuit_dashboards

    suite, cls, tokens = planted
    from circuits.graph import Node
    from circuits.sites import format_node_id

    def node(kind, layer, pos, feature):
        return Node(0, format_node_id(kind, layer, pos, feature), kind, layer, pos, feature, "", 1.0, 1.0, 0.5, 0.0, 0.0, True)

    nodes = [node("mlp_feature", 0, 2, 5), node("attn_feature", 1, 1, 3), node("mlp_feature", 0, 4, 5),
             node("mlp_error", 0, 4, -1), node("embed", -1, 0, -1)]
    assert circuit_feature_requests(nodes) == {"mlp0": [5], "attn1": [3]}
    links = write_circuit_dashboards(suite, nodes, tmp_path, tokens=tokens)
    assert links == {"mlp0:5@2": "dashboards/mlp0_f5.html", "attn1:3@1": "dashboards/attn1_f3.html", "mlp0:5@4": "dashboards/mlp0_f5.html"}
    assert all((tmp_path / href).is_file() for href in links.values())
