"""The linear-probe reference of the detector search, on the tiny suite with a planted token direction."""

import json

import pytest
import torch

from analysis.probes import collect_hook, fit_logistic, model_prediction_reference, probe_hooks
from analysis.scorecard import FULL_STOP, class_mask, class_scores, token_set_from_texts, vocab_texts
from dashboard_fixtures import planted_suite, save_suite, tiny_tokens

HOOK = "blocks.0.ln2.hook_normalized"


@pytest.fixture(scope="module")
def planted():
    suite, token_class, _ = planted_suite("import")
    return suite, token_class, tiny_tokens(suite, copies=6)


def test_a_probe_reads_a_class_the_model_writes_linearly(planted):
    suite, token_class, tokens = planted
    (res,) = probe_hooks(suite.model, token_class, [HOOK], tokens)
    assert res.n_class_eval > 0 and res.accuracy > 0.99
    assert res.best["specificity"] > 0.95 and res.best["sensitivity"] > 0.95


def test_a_probe_of_shuffled_labels_scores_low(planted):
    suite, token_class, tokens = planted
    x = collect_hook(suite.model, HOOK, tokens)
    mask = class_mask(token_class, tokens, vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab))[:, 1:].flatten()
    g = torch.Generator().manual_seed(1)
    shuffled = mask[torch.randperm(mask.numel(), generator=g)]
    half = mask.numel() // 2
    logit = fit_logistic(x[:half], shuffled[:half])(x[half:])
    scores = [class_scores(torch.relu(logit + s), shuffled[half:]) for s in (0.0, 1.0, 2.0, 4.0)]
    assert max(min(sc.specificity, sc.sensitivity) for sc in scores) < 0.3
    # and the same probe fitted on the true labels is a detector: the control fails for the right reason
    true = fit_logistic(x[:half], mask[:half])(x[half:])
    assert class_scores(torch.relu(true), mask[half:]).specificity > 0.95


def test_probe_refuses_bad_input(planted):
    suite, token_class, tokens = planted
    with pytest.raises(ValueError, match="unknown hook"):
        probe_hooks(suite.model, token_class, ["blocks.9.nothing"], tokens)
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic(torch.full((10, 3), float("nan")), torch.zeros(10, dtype=torch.bool))


def test_cli_probe_writes_json(planted, tmp_path, capsys):
    from scripts.cli import main

    suite_dir = save_suite(planted[0], tmp_path / "suite")
    out = tmp_path / "probe"
    rc = main(["probe", "--model", "planted", "--suite-dir", str(suite_dir), "--token", "import", "--n-tokens", "3000",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "probes.json").read_text())
    hooks = [p["hook"] for p in report["probes"]]
    assert hooks[0] == "blocks.0.attn.hook_z" and HOOK in hooks  # every dictionary input, in suite order
    (planted_hook,) = [p for p in report["probes"] if p["hook"] == HOOK]
    assert planted_hook["best"]["specificity"] > 0.9 and planted_hook["best"]["sensitivity"] > 0.9
    assert report["model_prediction"] is None  # `import` has no context rule
    assert main(["probe", "--model", "planted", "--suite-dir", str(suite_dir), "--n-tokens", "0", "--out", str(out)]) == 2


# The model's own prediction as a reference for a class narrowed by what follows (the full stop).
DOTS_TEXT = "The cat sat. x = os.path\nIt ran. y = a.b\n"  # per copy: two full stops, two attribute dots


def _predicting(follower_text: str):
    """A tiny suite whose unembedding predicts the token ``follower_text`` at every '.' and nothing in particular
    elsewhere: the planted '.' direction (residual dimension 0, large on '.' only) is read into that token's logit."""
    suite, _, _ = planted_suite(".")
    model = suite.model
    texts = vocab_texts(model.tokenizer, model.cfg.d_vocab)
    follower = texts.index(follower_text)
    with torch.no_grad():
        model.unembed.W_U.zero_()
        model.unembed.b_U.zero_()
        model.unembed.W_U[0, follower] = 10.0
    return suite, token_set_from_texts(model, [DOTS_TEXT] * 8)


def test_the_model_prediction_reference_reads_the_prediction_at_the_token_itself():
    suite, tokens = _predicting("\n")  # a newline after every '.': the model says "full stop" everywhere
    texts = vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab)
    mask = class_mask(FULL_STOP, tokens, texts)
    dots = torch.isin(tokens.rows, torch.tensor([i for i, t in enumerate(texts) if t.strip() == "."]))
    dots[:, 0] = False
    ref = model_prediction_reference(suite.model, FULL_STOP, tokens)
    assert ref["n_member_tokens"] == int(dots.sum()) and ref["n_class"] == int(mask.sum()) > 0
    share = int(mask.sum()) / int(dots.sum())  # every '.' fires alike, so the activation share is the class share
    assert 0.3 < share < 0.7
    for row in ref["by_threshold"]:
        assert row["sensitivity"] == 1.0 and row["specificity"] == pytest.approx(share, abs=1e-3)
    assert ref["accuracy_at_0.5"] == pytest.approx(share, abs=1e-3)


def test_the_model_prediction_reference_is_zero_when_the_model_predicts_attribute_access():
    suite, tokens = _predicting("p")  # a letter after every '.': never a full stop
    ref = model_prediction_reference(suite.model, FULL_STOP, tokens)
    kept = [row for row in ref["by_threshold"] if row["threshold"] > 0]
    assert kept and all(row["sensitivity"] == 0.0 and row["specificity"] == 0.0 for row in kept)
    # (at threshold 0 the tiny probabilities still count: the scorecard's firing rule is relative to the maximum)
    assert ref["accuracy_at_0.5"] == pytest.approx(1 - ref["n_class"] / ref["n_member_tokens"], abs=1e-3)


def test_the_model_prediction_reference_needs_a_context_rule(planted):
    suite, token_class, tokens = planted
    with pytest.raises(ValueError, match="no context rule"):
        model_prediction_reference(suite.model, token_class, tokens)
