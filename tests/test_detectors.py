"""Detector search: finds a planted detector, agrees with the scorecard, writes its report; the command line."""

import json

import pytest

from analysis.detectors import DETECTOR_KEYS, find_detectors, rank_features, write_detector_report
from analysis.scorecard import TokenClass, class_mask, class_scores, collect_activations, vocab_texts
from dashboard_fixtures import PLANTED_FEATURE, planted_suite, save_suite, tiny_tokens


@pytest.fixture(scope="module")
def planted():
    suite, cls, members = planted_suite()
    return suite, cls, tiny_tokens(suite)


def test_search_finds_the_planted_detector(planted):
    suite, cls, tokens = planted
    (best,) = find_detectors(suite, [cls], tokens=tokens)
    assert (best.dictionary, best.feature) == ("mlp0", PLANTED_FEATURE)
    assert best.specificity == 1.0 and best.sensitivity == 1.0


def test_search_agrees_with_the_scorecard(planted):
    """The streaming search (running maxima, kept candidates) gives the numbers of the direct computation."""
    suite, cls, tokens = planted
    texts = vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab)
    for_class = TokenClass("for", ("for",))
    ranking = rank_features(suite, [for_class, cls], tokens, top=4, batch_rows=5)
    for cand in ranking["for"] + ranking["import"][1:]:
        c = for_class if cand.token_class == "for" else cls
        fa = collect_activations(suite, cand.dictionary, [cand.feature], tokens)
        ref = class_scores(fa.acts[:, 1:, 0], class_mask(c, tokens, texts)[:, 1:])
        assert cand.specificity == pytest.approx(ref.specificity, abs=1e-4)
        assert cand.sensitivity == pytest.approx(ref.sensitivity, abs=1e-4)
    scores = [c.score for c in ranking["for"]]
    assert scores == sorted(scores, reverse=True)


def test_search_refuses_bad_classes(planted):
    suite, cls, tokens = planted
    with pytest.raises(ValueError, match="no token classes"):
        rank_features(suite, [], tokens)
    with pytest.raises(ValueError, match="never occurs"):
        rank_features(suite, [TokenClass("s", ("s",), followed_by="QQQ")], tokens)


def test_report_files(planted, tmp_path):
    suite, cls, tokens = planted
    entries = write_detector_report(suite, [cls, TokenClass("for", ("for",))], tmp_path, tokens=tokens)
    on_disk = json.loads((tmp_path / "detectors.json").read_text())
    assert on_disk == entries
    assert [e["token_class"] for e in on_disk] == ["import", "for"]
    assert set(DETECTOR_KEYS) <= set(on_disk[0])
    first = on_disk[0]
    assert (first["dictionary"], first["feature"], first["specificity"], first["sensitivity"]) == ("mlp0", PLANTED_FEATURE, 1.0, 1.0)
    assert first["meets_floor"] is True
    assert len(first["top_logits"]) == 10 and first["top_logits"][0]["weight"] >= first["top_logits"][-1]["weight"]
    index = (tmp_path / "index.html").read_text()
    for e in on_disk:
        page = (tmp_path / e["dashboard"]).read_text()
        assert f"href='{e['dashboard']}'" in index
        assert "class='scorecard'" in page and "<script src" not in page


@pytest.fixture(scope="module")
def suite_dir(planted, tmp_path_factory):
    return save_suite(planted[0], tmp_path_factory.mktemp("planted-suite"))


def test_cli_detectors_on_a_saved_suite(suite_dir, tmp_path, capsys):
    from scripts.cli import main

    out = tmp_path / "det"
    rc = main(["detectors", "--model", "planted", "--suite-dir", str(suite_dir), "--tokens", "import", "--n-tokens", "3000", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (entry,) = json.loads((out / "detectors.json").read_text())
    assert (entry["dictionary"], entry["feature"]) == ("mlp0", PLANTED_FEATURE)
    assert entry["specificity"] == 1.0 and entry["sensitivity"] == 1.0
    assert "met" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["detectors", "--tokens"], "--tokens was given no token classes; name at least one"),
    (["detectors", "--tokens", " "], "empty token class"),
    (["dashboard", "--dictionary", "mlp0", "--features", "3,x"], "give comma-separated feature indices"),
    (["dashboard", "--dictionary", "mlp7", "--features", "3"], "no dictionary 'mlp7'; it has: attn0, mlp0, attn1, mlp1"),
    (["dashboard", "--dictionary", "mlp0", "--features", "3,64"], "feature index 64 is out of range for mlp0, which has 64 features"),
])
def test_cli_errors_name_the_fix(suite_dir, tmp_path, capsys, argv, message):
    from scripts.cli import main

    rc = main(argv + ["--model", "planted", "--suite-dir", str(suite_dir), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The shipped mini suite against the detector floors (slow: a forward pass over all held-out tokens)


@pytest.fixture(scope="module")
def mini_detectors():
    from analysis.scorecard import DEFAULT_CLASSES
    from saes.suite import load_suite

    suite = load_suite("mini")
    return {c.token_class: c for c in find_detectors(suite, DEFAULT_CLASSES)}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param("full stop", marks=pytest.mark.xfail(strict=True, reason="no dictionary of the shipped suite "
                                                      "separates sentence ends from attribute access well enough yet")),
    "for",
    "import",
])
def test_the_mini_suite_has_a_detector_above_the_floors(mini_detectors, name):
    best = mini_detectors[name]
    assert best.specificity >= 0.8 and best.sensitivity >= 0.8, best
