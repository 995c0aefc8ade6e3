"""Feature cards: the one-pass statistics against brute-force recomputation, the cache (hit, corrupt, stale),
labels, text sources and the Neuronpedia parser, on a tiny seeded suite (no network)."""

import argparse
import json
import logging
import urllib.error

import pytest
import torch

import analysis.cards as cards_mod
from analysis.cards import (
    CardConfig, CardText, NoCardText, RunningStats, attach_dashboards, auto_label, build_feature_cards, card_text_source,
    collect_card_stats, logit_weights,
)
from analysis.neuronpedia import neuronpedia_labels, parse_neuronpedia_feature
from analysis.scorecard import (
    collect_activations, decoder_logit_weights, dictionary_input, scorecard, token_set_from_texts, write_scorecard,
)
from saes.dictionary import encode, spec_of
from saes.suite import Suite
from saes.testing import TINY_TEXT, make_suite
from scripts.cards_args import add_card_args, cards_from_args, check_card_args, circuit_features

CARD_KEYS = {"title", "label", "contexts", "top_logits", "bottom_logits", "histogram", "scorecard", "dashboard"}


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    suite = make_suite(n_layers=2, d_sae=64, seed=3)
    texts = [TINY_TEXT[i:] + TINY_TEXT[:i] for i in range(0, len(TINY_TEXT), 37)]
    tokens = token_set_from_texts(suite.model, texts, n_tokens=31 * 40, n_ctx=32)  # 40 rows
    return suite, tokens


def dense_acts(suite, name, tokens, batch_rows=3):
    """Every feature's activation on every token, all kept: the brute-force reference. (Batches of the pass's
    size, so that the floats agree bit for bit and no activation moves across a bin edge.)"""
    sae = suite.dictionary(name)
    hook = spec_of(sae).hook_in
    out = []
    with torch.no_grad():
        for start in range(0, len(tokens.rows), batch_rows):
            _, cache = suite.model.run_with_cache(tokens.rows[start : start + batch_rows], names_filter=lambda n: n == hook)
            out.append(encode(sae, dictionary_input(cache[hook], hook)))
    return torch.cat(out)


# Small batches so that the running top-k and the doubling histogram see many updates.
SMALL = CardConfig(n_contexts=5, n_bins=16, batch_elements=3 * 32 * 64)


@pytest.mark.parametrize("name", ["attn1", "mlp0"])
def test_top_contexts_are_the_largest_row_maxima(tiny, name):
    suite, tokens = tiny
    assert tokens.rows.shape[0] >= 8  # several batches of 3 rows
    stats = collect_card_stats(suite, [name], tokens, SMALL, progress=False)[name]
    acts = dense_acts(suite, name, tokens)[:, 1:]  # BOS excluded
    row_max = acts.max(dim=1).values  # [rows d_sae]
    expected = row_max.T.topk(SMALL.n_contexts, dim=1).values
    expected = torch.where(expected > 0, expected, torch.zeros_like(expected))
    torch.testing.assert_close(stats.top_values, expected, rtol=1e-5, atol=1e-6)
    fired = stats.top_rows >= 0
    assert fired.any() and (stats.top_values[fired] > 0).all() and (stats.top_values[~fired] == 0).all()
    for f, k in fired.nonzero().tolist():
        r, p = int(stats.top_rows[f, k]), int(stats.top_pos[f, k])
        assert p >= 1  # never the BOS
        assert float(acts[r, p - 1, f]) == pytest.approx(float(stats.top_values[f, k]), rel=1e-5)
        assert float(acts[r, :, f].max()) == pytest.approx(float(stats.top_values[f, k]), rel=1e-5)
    rows_per_feature = [set(stats.top_rows[f][fired[f]].tolist()) for f in range(acts.shape[-1])]
    assert all(len(s) == int(fired[f].sum()) for f, s in enumerate(rows_per_feature))  # distinct rows


@pytest.mark.parametrize("name", ["attn0", "mlp1"])
def test_histogram_counts_every_active_token_once(tiny, name):
    suite, tokens = tiny
    stats = collect_card_stats(suite, [name], tokens, SMALL, progress=False)[name]
    acts = dense_acts(suite, name, tokens)[:, 1:].reshape(-1, suite.dictionary(name).cfg.d_sae)
    assert stats.n_tokens == acts.shape[0] == tokens.n_tokens
    active = (acts > 0).sum(0)
    assert torch.equal(stats.n_active, active) and torch.equal(stats.hist_counts.sum(1), active)
    maxima = acts.max(0).values
    live = active > 0
    assert (stats.hist_range[live] > maxima[live]).all() and (maxima[live] >= stats.hist_range[live] / 2).all()
    assert torch.equal(torch.exp2(torch.log2(stats.hist_range[live]).round()), stats.hist_range[live])  # powers of two
    assert (stats.hist_range[~live] == 0).all()
    for f in live.nonzero().flatten().tolist():
        a = acts[:, f][acts[:, f] > 0]
        bins = (a / stats.hist_range[f] * SMALL.n_bins).floor().long()
        assert torch.equal(torch.bincount(bins, minlength=SMALL.n_bins), stats.hist_counts[f]), f


def test_histogram_range_doubles_and_merges_exactly():
    r = RunningStats(d_sae=2, k=2, n_bins=4, device=torch.device("cpu"))
    first = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [0.6, 0.0], [1.0, 0.0]]])  # [batch pos d_sae], pos 0 is BOS
    r.update(first, 0)
    assert r.range.tolist() == [2.0, 0.0] and r.counts[0].tolist() == [1, 1, 1, 0]  # bins of 0.5 below 2
    second = torch.tensor([[[9.0, 9.0], [3.5, 0.0], [0.2, 2.0], [0.0, 0.0]]])
    r.update(second, 1)
    s = r.result()
    assert s.hist_range.tolist() == [4.0, 4.0]  # 2 -> 4 covers 3.5; 2.0 needs a range above it
    # values 0.1 0.6 1.0 3.5 0.2 over bins of width 1: [0,1) holds 0.1 0.6 0.2, [1,2) holds 1.0, [3,4) 3.5
    assert s.hist_counts[0].tolist() == [3, 1, 0, 1] and s.hist_counts[1].tolist() == [0, 0, 1, 0]
    assert s.top_values[0].tolist() == [3.5, 1.0] and s.top_rows[0].tolist() == [1, 0] and s.top_pos[0].tolist() == [1, 3]
    assert s.top_rows[1].tolist() == [1, -1] and s.top_values[1].tolist() == [2.0, 0.0]  # BOS's 9.0 never counts


def test_cards_follow_the_payload_contract(tiny, tmp_path):
    suite, tokens = tiny
    feats = [("mlp1", 3), ("attn0", 5), ("mlp1", 3)]
    cards = build_feature_cards(suite, feats, tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    assert list(cards) == ["mlp1:3", "attn0:5"]
    json.dumps(cards)  # JSON-ready
    acts = dense_acts(suite, "mlp1", tokens)
    for key, card in cards.items():
        assert set(card) == CARD_KEYS and card["scorecard"] is None and card["dashboard"] is None
        assert len(card["top_logits"]) == len(card["bottom_logits"]) == SMALL.n_logits
        assert [v for _, v in card["top_logits"]] == sorted((v for _, v in card["top_logits"]), reverse=True)
        assert card["top_logits"][-1][1] > card["bottom_logits"][-1][1]
        h = card["histogram"]
        assert len(h["edges"]) == len(h["counts"]) + 1 and h["counts"] and h["counts"][-1] > 0
        assert card["label"] == auto_label(card)
    ctx = cards["mlp1:3"]["contexts"]
    assert ctx and [c["activation"] for c in ctx] == sorted((c["activation"] for c in ctx), reverse=True)
    assert ctx[0]["activation"] == pytest.approx(float(acts[:, 1:, 3].max()), rel=1e-4)
    r, p = divmod(int(acts[:, 1:, 3].flatten().argmax()), acts.shape[1] - 1)
    text = suite.model.tokenizer.decode([int(tokens.rows[r, p + 1])])
    assert ctx[0]["tokens"][ctx[0]["index"]] == text
    assert len(ctx[0]["tokens"]) <= SMALL.before + 1 + SMALL.after


def test_scorecards_and_dashboards_are_attached_where_computed(tiny, tmp_path):
    suite, tokens = tiny
    fa = collect_activations(suite, "mlp1", [3], tokens)
    written = scorecard(suite, fa, 3, None, tokens, ablation_rows=2)
    write_scorecard(written, tmp_path / "dashboards" / "mlp1_f3.scorecard.json")
    cards = build_feature_cards(suite, [("mlp1", 3), ("attn0", 5)], tokens, cache_dir=tmp_path / "cache",
                                progress=False, config=SMALL, scorecard_dirs=[tmp_path / "dashboards"])
    assert cards["mlp1:3"]["scorecard"] == {k: float(written[k]) for k in cards_mod.SCORECARD_FIELDS}
    assert cards["attn0:5"]["scorecard"] is None
    attach_dashboards(cards, {"mlp1:3@4": "dashboards/mlp1_f3.html", "mlp1:3@6": "dashboards/mlp1_f3.html"})
    assert cards["mlp1:3"]["dashboard"] == "dashboards/mlp1_f3.html" and cards["attn0:5"]["dashboard"] is None


def test_attention_logits_go_through_each_heads_W_O(tiny):
    suite, _ = tiny
    w = logit_weights(suite, "attn1", [7])[0]
    # scorecard's uncentred weights, an independent implementation; centring subtracts mean(d) * sum_d W_U[d].
    sae, W_U = suite.dictionary("attn1"), suite.model.W_U.detach()
    direction = torch.einsum("hd,hdm->m", sae.W_dec[7].detach().view(suite.model.cfg.n_heads, -1), suite.model.W_O[1].detach())
    reference = decoder_logit_weights(suite, "attn1", 7) - direction.mean() * W_U.sum(0)
    torch.testing.assert_close(w, reference, rtol=1e-4, atol=1e-5)


class CountingPass:
    def __init__(self):
        self.calls = []

    def __call__(self, suite, dictionaries, *args, **kwargs):
        self.calls.append(list(dictionaries))
        return collect_card_stats(suite, dictionaries, *args, **kwargs)


def test_cache_hit_skips_the_pass_and_returns_identical_cards(tiny, tmp_path, monkeypatch):
    suite, tokens = tiny
    counter = CountingPass()
    monkeypatch.setattr(cards_mod, "collect_card_stats", counter)
    first = build_feature_cards(suite, [("mlp0", 1), ("attn1", 2)], tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    assert counter.calls == [["mlp0", "attn1"]]
    again = build_feature_cards(suite, [("mlp0", 1), ("attn1", 2)], tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    assert again == first and len(counter.calls) == 1
    # Other features of cached dictionaries need no pass either; a new dictionary gets one pass of its own.
    build_feature_cards(suite, [("mlp0", 9), ("mlp1", 4)], tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    assert counter.calls == [["mlp0", "attn1"], ["mlp1"]]
    # Other text is another cache entry.
    fewer = token_set_from_texts(suite.model, [TINY_TEXT], n_ctx=32)
    build_feature_cards(suite, [("mlp0", 1)], fewer, cache_dir=tmp_path, progress=False, config=SMALL)
    assert counter.calls[-1] == ["mlp0"]


def test_corrupt_or_stale_cache_is_rebuilt_with_a_warning(tiny, tmp_path, monkeypatch, caplog):
    suite, tokens = tiny
    counter = CountingPass()
    monkeypatch.setattr(cards_mod, "collect_card_stats", counter)
    first = build_feature_cards(suite, [("mlp0", 1)], tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    (path,) = tmp_path.glob("*/mlp0.safetensors")
    path.write_bytes(b"\x00garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="analysis.cards"):
        rebuilt = build_feature_cards(suite, [("mlp0", 1)], tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    assert rebuilt == first and len(counter.calls) == 2 and "unreadable" in caplog.text
    # A dictionary whose weights changed does not read the old statistics.
    other = make_suite(n_layers=2, d_sae=64, seed=3)
    with torch.no_grad():
        other.transcoders[0].W_enc.mul_(-1)
    other = Suite(name=suite.name, model=suite.model, attn_saes=suite.attn_saes, transcoders=other.transcoders, info={})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="analysis.cards"):
        build_feature_cards(other, [("mlp0", 1)], tokens, cache_dir=tmp_path, progress=False, config=SMALL)
    assert len(counter.calls) == 3 and "other weights" in caplog.text


def test_bad_features_fail_before_the_pass(tiny, tmp_path, monkeypatch):
    suite, tokens = tiny
    counter = CountingPass()
    monkeypatch.setattr(cards_mod, "collect_card_stats", counter)
    with pytest.raises(IndexError, match="out of range for mlp0"):
        build_feature_cards(suite, [("mlp0", 64)], tokens, cache_dir=tmp_path, progress=False)
    with pytest.raises(KeyError, match="no dictionary 'mlp7'"):
        build_feature_cards(suite, [("mlp7", 1)], tokens, cache_dir=tmp_path, progress=False)
    assert counter.calls == []


def test_labels_are_short_deterministic_and_quoted():
    card = dict(
        contexts=[dict(tokens=["a", " import", "\n"], index=1, activation=3.0),
                  dict(tokens=[" import"], index=0, activation=2.0),
                  dict(tokens=["x", " from"], index=1, activation=1.0),
                  dict(tokens=[" averyveryverylongtoken"], index=0, activation=0.5),
                  dict(tokens=["\n"], index=0, activation=0.1)],
        top_logits=[[" os", 2.0], [" sys", 1.5], ['"', 1.0], ["never", 0.5]],
    )
    assert auto_label(card) == 'on " import" " from" " averyveryv…" → " os" " sys" "\\""'
    assert auto_label(card) == auto_label(json.loads(json.dumps(card)))
    assert auto_label(dict(contexts=[], top_logits=[["\n", 1.0]])) == 'inactive on held-out text → "\\n"'
    long = dict(contexts=[dict(tokens=["w" * 30], index=0, activation=1.0)] * 3, top_logits=[["z" * 40, 1.0]] * 3)
    assert len(auto_label(long)) <= 60


def test_text_sources(tiny, tmp_path, monkeypatch):
    suite, _ = tiny
    mini_like = Suite(name="mini", model=suite.model, attn_saes={}, transcoders={}, info={"corpus_python": "3.11.7"})
    assert card_text_source(mini_like, None) == CardText("corpus", "heldout")
    (tmp_path / "a.py").write_text("import os\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    folder = card_text_source(suite, str(tmp_path))
    assert folder.kind == "folder" and list(folder.texts()) == ["import os\n"]
    assert card_text_source(suite, str(tmp_path / "a.py")).kind == "file"
    assert card_text_source(suite, "NeelNanda/pile-10k:train") == CardText("dataset", "NeelNanda/pile-10k:train")
    gpt2_like = Suite(name="gpt2-small", model=suite.model, attn_saes={}, transcoders={}, info={})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    default = card_text_source(gpt2_like, None)  # online: a slice of a small public dataset, loaded only when used
    assert default.kind == "dataset" and default.default and default.name.startswith("NeelNanda/pile-10k")
    with pytest.raises(ValueError, match="no such file or folder"):
        card_text_source(suite, "./missing-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        card_text_source(suite, str(tmp_path / "empty"))


def test_gpt2_small_without_text_gives_no_cards_and_a_note(tiny, monkeypatch, tmp_path):
    suite, _ = tiny
    gpt2_like = Suite(name="gpt2-small", model=suite.model, attn_saes=suite.attn_saes, transcoders=suite.transcoders, info={})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NoCardText, match="^no feature cards: "):
        card_text_source(gpt2_like, None)
    parser = argparse.ArgumentParser()
    add_card_args(parser)
    args = parser.parse_args(["--cards-cache", str(tmp_path)])
    cards, labels, note = cards_from_args(args, gpt2_like, [("mlp1", 3), ("attn0", 5)])
    assert cards == {} and note.startswith("no feature cards: ") and "--cards-text" in note
    assert set(labels) == {"mlp1:3", "attn0:5"} and all(l.startswith("→ ") for l in labels.values())
    assert not list(tmp_path.iterdir())  # no pass, nothing cached
    # Text named by the user gives cards.
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "t.txt").write_text(TINY_TEXT * 3)
    args = parser.parse_args(["--cards-text", str(tmp_path / "text"), "--cards-cache", str(tmp_path / "cache"), "--cards-tokens", "200"])
    cards, labels, note = cards_from_args(args, gpt2_like, [("mlp1", 3)])
    assert note is None and labels == {"mlp1:3": cards["mlp1:3"]["label"]}
    nodes = [dict(kind="mlp_feature", layer=1, feature=3), dict(kind="embed", layer=-1, feature=-1),
             dict(kind="attn_feature", layer=0, feature=5), dict(kind="mlp_feature", layer=1, feature=3)]
    assert circuit_features(nodes) == [("mlp1", 3), ("attn0", 5)]
    for bad, message in ((["--cards-text", str(tmp_path / "nope")], "no such file or folder"),
                         (["--cards-tokens", "0"], "must be positive")):
        with pytest.raises(ValueError, match=message):
            check_card_args(parser.parse_args(bad), gpt2_like)
    mini_like = Suite(name="mini", model=suite.model, attn_saes={}, transcoders={}, info={"corpus_python": "3.11.7"})
    with pytest.raises(ValueError, match="no explanations for suite 'mini'"):
        check_card_args(parser.parse_args(["--labels", "neuronpedia"]), mini_like)
    args = parser.parse_args(["--no-cards"])
    assert cards_from_args(args, gpt2_like, [("mlp1", 3)])[2] == "no feature cards: --no-cards was given"


# The shape of Neuronpedia's /api/feature/{model}/{source}/{index} answer (fields trimmed).
RECORDED = {
    "modelId": "gpt2-small", "layer": "5-att-kk", "index": "17", "maxActApprox": 3.2,
    "explanations": [
        {"id": "x1", "description": "  references to\n Python imports ", "explanationModelName": "gpt-4o-mini",
         "typeName": "oai_token-act-pair"},
        {"id": "x2", "description": "another", "typeName": "other"},
    ],
    "pos_str": [" os", " sys"], "neg_str": ["the"],
}


def test_neuronpedia_parsing_and_urls():
    assert parse_neuronpedia_feature(RECORDED) == "references to Python imports"
    assert parse_neuronpedia_feature({"explanations": []}) is None
    assert parse_neuronpedia_feature({"explanations": [{"description": "  "}]}) is None
    asked = []

    def fetch(url, timeout):
        asked.append(url)
        return RECORDED if url.endswith("/5-att-kk/17") else None

    labels = neuronpedia_labels("gpt2-small", [("attn5", 17), ("mlp8", 1), ("attn5", 17)], fetch=fetch)
    assert labels == {"attn5:17": "references to Python imports"}
    assert sorted(asked) == ["https://www.neuronpedia.org/api/feature/gpt2-small/5-att-kk/17",
                             "https://www.neuronpedia.org/api/feature/gpt2-small/8-tres-dc/1"]
    with pytest.raises(ValueError, match="no explanations for suite 'mini'"):
        neuronpedia_labels("mini", [("mlp0", 1)], fetch=fetch)

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(ConnectionError, match="could not reach neuronpedia.org"):
        neuronpedia_labels("gpt2-small", [("mlp0", 1)], fetch=offline)


def test_config_is_validated():
    with pytest.raises(ValueError, match="power of two"):
        CardConfig(n_bins=24)
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        CardConfig(n_tokens=0)


def test_shape_annotations_hold(tiny):
    from jaxtyping import TypeCheckError, jaxtyped

    beartype = pytest.importorskip("beartype").beartype
    suite, _ = tiny
    checked = lambda fn: jaxtyped(typechecker=beartype)(fn)  # noqa: E731
    assert checked(logit_weights)(suite, "attn0", [1, 2]).shape == (2, suite.model.cfg.d_vocab)
    assert checked(cards_mod.first_range)(torch.tensor([0.3, 1.0, 5.0])).tolist() == [0.5, 2.0, 8.0]
    r = RunningStats(d_sae=4, k=2, n_bins=4, device=torch.device("cpu"))
    checked(RunningStats.update)(r, torch.rand(2, 5, 4), 0)
    with pytest.raises(TypeCheckError):
        checked(cards_mod.first_range)(torch.ones(2, 2))


def tiny_clt(suite, d_sae=24, seed=12):
    """The tiny suite's model with a random ReLU cross-layer transcoder in place of its transcoders."""
    from saes.clt import CLTConfig, CrossLayerTranscoder

    cfg = suite.model.cfg
    clt = CrossLayerTranscoder(CLTConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, d_sae=d_sae))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / cfg.d_model**0.5)
        clt.b_enc.add_(0.1)
    for p in clt.parameters():
        p.requires_grad_(False)
    return Suite(name=suite.name + "-clt", model=suite.model, attn_saes=dict(suite.attn_saes), transcoders={}, clt=clt, info={})


def test_cross_layer_transcoder_cards_read_its_layer_and_sum_its_writes(tiny, tmp_path):
    suite, tokens = tiny
    clt_suite = tiny_clt(suite)
    clt = clt_suite.clt
    stats = collect_card_stats(clt_suite, ["mlp1"], tokens, SMALL, progress=False)["mlp1"]
    hook = "blocks.1.ln2.hook_normalized"
    with torch.no_grad():
        dense = []
        for start in range(0, len(tokens.rows), 3):
            _, cache = suite.model.run_with_cache(tokens.rows[start : start + 3], names_filter=lambda n: n == hook)
            dense.append(clt.encode(1, cache[hook]))
    acts = torch.cat(dense)[:, 1:].reshape(-1, clt.cfg.d_sae)
    assert torch.equal(stats.n_active, (acts > 0).sum(0)) and stats.n_active.any()
    # layer 0's features write into both layers; every write reaches the unembedding, centred by the final LN
    W_U = suite.model.W_U.detach()
    for f in (0, 5):
        vecs = clt.decoder_vectors(0, f)
        assert vecs.shape[0] == 2
        expected = sum((v - v.mean()) @ W_U for v in vecs)
        torch.testing.assert_close(logit_weights(clt_suite, "mlp0", [f])[0], expected, rtol=1e-4, atol=1e-5)
    cards = build_feature_cards(clt_suite, [("mlp0", 5), ("mlp1", 3), ("attn0", 5)], tokens, cache_dir=tmp_path,
                                progress=False, config=SMALL)
    assert set(cards) == {"mlp0:5", "mlp1:3", "attn0:5"} and all(set(c) == CARD_KEYS for c in cards.values())
    assert "cross-layer transcoder" in cards["mlp1:3"]["title"] and "cross-layer" not in cards["attn0:5"]["title"]
    labels = cards_mod.logit_labels(clt_suite, [("mlp0", 5)])
    assert set(labels) == {"mlp0:5"}
    with pytest.raises(IndexError, match="out of range for mlp1"):
        build_feature_cards(clt_suite, [("mlp1", 24)], tokens, cache_dir=tmp_path, progress=False)


def test_skip_transcoder_cards_are_those_of_its_features(tiny, tmp_path):
    import copy

    suite, tokens = tiny
    tc = copy.deepcopy(suite.transcoders[1])
    tc.W_skip = torch.nn.Parameter(torch.randn(tc.W_dec.shape[1], tc.W_enc.shape[0]), requires_grad=False)
    skip = Suite(name=suite.name, model=suite.model, attn_saes=suite.attn_saes, transcoders={**suite.transcoders, 1: tc}, info={})
    plain = build_feature_cards(suite, [("mlp1", 3)], tokens, cache_dir=tmp_path / "a", progress=False, config=SMALL)
    with_skip = build_feature_cards(skip, [("mlp1", 3)], tokens, cache_dir=tmp_path / "b", progress=False, config=SMALL)
    assert with_skip == plain  # the skip path is not a feature: it changes neither activations nor logits


def test_dashboards_refuse_cross_layer_transcoder_features_in_one_line(tiny):
    from analysis.dashboards import check_dashboard_dictionaries

    clt_suite = tiny_clt(tiny[0])
    check_dashboard_dictionaries(clt_suite, ["attn0", "attn1"])  # attention SAEs are drawn as usual
    with pytest.raises(ValueError, match="cross-layer transcoder features, which sae-vis cannot draw") as e:
        check_dashboard_dictionaries(clt_suite, ["attn0", "mlp1"])
    assert "\n" not in str(e.value) and "mlp1" in str(e.value)


def test_a_traced_clt_circuit_gets_a_card_and_label_for_every_feature_node(tiny, tmp_path):
    """The command line's path: trace, the circuit's features, cards from a text file (what failed before on CLTs)."""
    from circuits.trace import trace

    clt_suite = tiny_clt(tiny[0])
    circuit = trace(clt_suite, "import os\nfor i in range(3):", None, threshold=0.02, progress=False, faithfulness=False).circuit
    feats = circuit_features(circuit.nodes())
    assert any(d.startswith("mlp") for d, _ in feats)
    (tmp_path / "text.py").write_text(TINY_TEXT)
    args = argparse.Namespace(cards_text=str(tmp_path / "text.py"), cards_tokens=500, cards_cache=tmp_path / "cache",
                              no_cards=False, labels="auto", no_progress=True)
    cards, labels, note = cards_from_args(args, clt_suite, feats)
    keys = {f"{d}:{f}" for d, f in feats}
    assert note is None and set(cards) == keys and set(labels) == keys
