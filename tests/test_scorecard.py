"""Scorecards: a planted detector scores 1.0 / 1.0, a shuffled control scores low, the full-stop rule, the
downstream numbers against slow references, and clear errors on bad input."""

import numpy as np
import pytest
import torch

from analysis.scorecard import (
    FULL_STOP, RunningPearson, TokenClass, TokenSet, class_mask, class_scores, collect_activations,
    decoder_logit_weights, parse_token_class, scorecard, token_set_from_texts, vocab_texts,
)
from dashboard_fixtures import PLANTED_FEATURE, planted_suite, tiny_tokens


@pytest.fixture(scope="module")
def planted():
    suite, cls, members = planted_suite()
    tokens = tiny_tokens(suite)
    texts = vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab)
    fa = collect_activations(suite, "mlp0", [PLANTED_FEATURE, 1, 2], tokens)
    return suite, cls, members, tokens, texts, fa


def test_class_scores_by_hand():
    acts = torch.tensor([0.0, 1.0, 2.0, 0.05, 3.0])
    mask = torch.tensor([False, True, True, True, False])
    s = class_scores(acts, mask)
    assert s.specificity == pytest.approx(3.05 / 6.05)
    assert s.sensitivity == pytest.approx(2 / 3)  # 0.05 is below 10% of the maximum 3.0
    assert s.max_act == pytest.approx(3.0) and s.n_class == 3


def test_planted_detector_scores_one_and_one(planted):
    suite, cls, members, tokens, texts, fa = planted
    mask = class_mask(cls, tokens, texts)
    acts = fa.acts[..., 0]
    assert int(mask.sum()) == int(torch.isin(tokens.rows[:, 1:], torch.tensor(members)).sum()) > 10
    assert (acts[mask] > 1).all() and (acts[~mask] == 0).all()  # the wiring did what it says
    card = scorecard(suite, fa, PLANTED_FEATURE, cls, tokens, texts, ablation_rows=len(tokens.rows))
    assert card["specificity"] == 1.0 and card["sensitivity"] == 1.0
    assert card["token_class"] == "import" and card["claimed_by"] == "given"
    assert card["n_class_tokens"] == int(mask.sum())
    # Ablation is measured at every firing position that has a next token in its row (all rows allowed here).
    assert card["ablation_positions"] == int(mask[:, :-1].sum())
    assert card["ablation_delta_loss"] != 0.0
    # Without a claim, the class is the feature's top token: the planted one.
    assert scorecard(suite, fa, PLANTED_FEATURE, None, tokens, texts)["token_class"] == "import"


def test_shuffled_control_scores_low(planted):
    suite, cls, members, tokens, texts, fa = planted
    mask = class_mask(cls, tokens, texts)[:, 1:].flatten()
    acts = fa.acts[:, 1:, 0].flatten()
    gen = torch.Generator().manual_seed(0)
    shuffled = mask[torch.randperm(len(mask), generator=gen)]
    s = class_scores(acts, shuffled)
    assert s.specificity < 0.3 and s.sensitivity < 0.3
    # A random feature of the same dictionary, against the planted class, is no detector either.
    r = class_scores(fa.acts[:, 1:, 1], class_mask(cls, tokens, texts)[:, 1:])
    assert min(r.specificity, r.sensitivity) < 0.5


def _tokens_of(model, pieces: list[str], following: str | None = None) -> TokenSet:
    """One row made of ``pieces``, each tokenised on its own (so '.' is its own token)."""
    tok = model.tokenizer
    ids = [tok.bos_token_id]
    for p in pieces:
        ids += tok(p, add_special_tokens=False)["input_ids"]
    nxt = tok.eos_token_id if following is None else tok(following, add_special_tokens=False)["input_ids"][0]
    return TokenSet(torch.tensor([ids]), torch.tensor([nxt]))


def test_full_stop_rule_against_attribute_access(planted):
    suite, *_ = planted
    texts = vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab)
    pieces = ["os", ".", "path", ".", " It", " ran", ".", "\n", "x", " ", "'", "a", ".", "'", " y", "."]
    ts = _tokens_of(suite.model, pieces)
    dots = [i for i, t in enumerate(ts.rows[0].tolist()) if texts[t] == "."]
    assert len(dots) == 5
    mask = class_mask(FULL_STOP, ts, texts)[0]
    # os.path -> no; path. It -> yes; ran.\n -> yes; 'a.' -> yes (a quote follows); y. at the end of text -> yes
    assert [bool(mask[i]) for i in dots] == [False, True, True, True, True]
    # The same final '.' is attribute access when the text goes on with a name (the row's following token).
    ts2 = _tokens_of(suite.model, pieces, following="path")
    assert not class_mask(FULL_STOP, ts2, texts)[0][dots[-1]]
    # Without the context rule, every '.' counts.
    assert int(class_mask(TokenClass("dot", (".",)), ts, texts).sum()) == 5


def test_token_set_rows_and_following(planted):
    suite, *_ = planted
    text = "import os\nfor i in range(10):\n    print(i)\n" * 6
    ts = token_set_from_texts(suite.model, [text], n_ctx=8)
    tok = suite.model.tokenizer
    stream = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert (ts.rows[:, 0] == tok.bos_token_id).all()
    flat = ts.rows[:, 1:].flatten().tolist()
    assert flat == stream[: len(flat)]
    for r in range(len(ts.rows) - 1):
        assert int(ts.following[r]) == int(ts.rows[r + 1, 1])
    assert ts.n_tokens == len(flat)


def test_running_pearson_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen)
    y = torch.cat([x[:, :1] * 2 + 0.1 * torch.randn(300, 1, generator=gen), torch.randn(300, 4, generator=gen), torch.ones(300, 1)], 1)
    rp = RunningPearson()
    for xs, ys in zip(x.split(70), y.split(70)):
        rp.update(xs, ys)
    ref = np.corrcoef(x.T.numpy(), y[:, :-1].T.numpy())[:3, 3:]
    got = rp.pearson()
    assert np.allclose(got[:, :-1].numpy(), ref, atol=1e-10)
    assert (got[:, -1] == 0).all()  # a constant neuron correlates with nothing
    assert got[0, 0] > 0.99


def test_logit_weights_match_per_head_reference(planted):
    suite, *_ = planted
    model = suite.model
    sae = suite.dictionary("attn1")
    d_head = model.cfg.d_head
    w = sae.W_dec[7]
    ref = sum(w[h * d_head : (h + 1) * d_head] @ model.blocks[1].attn.W_O[h] for h in range(model.cfg.n_heads)) @ model.W_U
    assert torch.allclose(decoder_logit_weights(suite, "attn1", 7), ref, atol=1e-5)
    tc = suite.dictionary("mlp1")
    assert torch.allclose(decoder_logit_weights(suite, "mlp1", 3), tc.W_dec[3] @ model.W_U, atol=1e-5)


def test_neuron_correlation_finds_a_copied_neuron(planted):
    """A transcoder feature that reads exactly what an MLP neuron reads (its W_in column, no bias, ReLU) is
    strongly correlated with that neuron; the scorecard must name it."""
    suite, cls, members, tokens, texts, fa = planted
    model = suite.model
    tc = suite.transcoders[1]
    with torch.no_grad():
        old = tc.W_enc[:, 9].clone(), tc.b_enc[9].clone()
        tc.W_enc[:, 9] = model.blocks[1].mlp.W_in[:, 4]
        tc.b_enc[9] = model.blocks[1].mlp.b_in[4]
    try:
        fa1 = collect_activations(suite, "mlp1", [9], tokens)
        card = scorecard(suite, fa1, 9, None, tokens, texts)
    finally:
        with torch.no_grad():
            tc.W_enc[:, 9], tc.b_enc[9] = old
    assert card["max_neuron"] == "blocks.1.mlp.hook_post[4]"
    assert card["max_neuron_corr"] > 0.9


def test_bad_inputs(planted):
    suite, cls, members, tokens, texts, fa = planted
    with pytest.raises(KeyError, match="no dictionary 'mlp9'.*it has: attn0, mlp0"):
        collect_activations(suite, "mlp9", [1], tokens)
    with pytest.raises(IndexError, match="out of range for mlp0, which has 64 features"):
        collect_activations(suite, "mlp0", [64], tokens)
    with pytest.raises(ValueError, match="no features given"):
        collect_activations(suite, "mlp0", [], tokens)
    with pytest.raises(ValueError, match="empty token class"):
        parse_token_class("  ")
    with pytest.raises(ValueError, match="stripped"):
        TokenClass("x", (" for",))
    with pytest.raises(ValueError, match="no token of this vocabulary"):
        class_mask(TokenClass("zebra", ("zzzzqq",)), tokens, texts)
    with pytest.raises(ValueError, match="never occurs"):
        class_scores(torch.ones(4), torch.zeros(4, dtype=torch.bool))
    assert parse_token_class(".") == FULL_STOP and parse_token_class("for").texts == ("for",)


def test_ablating_a_zero_direction_changes_nothing(planted):
    """The ablation subtracts act * W_dec[f]; with that row zeroed the loss must not move (the clean loss comes
    from the activation pass, the ablated one from a separate run)."""
    suite, cls, members, tokens, texts, fa = planted
    tc = suite.transcoders[0]
    with torch.no_grad():
        saved = tc.W_dec[PLANTED_FEATURE].clone()
        tc.W_dec[PLANTED_FEATURE] = 0.0
    try:
        card = scorecard(suite, fa, PLANTED_FEATURE, cls, tokens, texts)
    finally:
        with torch.no_grad():
            tc.W_dec[PLANTED_FEATURE] = saved
    assert card["ablation_positions"] > 10
    assert abs(card["ablation_delta_loss"]) < 1e-5


def test_a_feature_that_never_fires_gets_an_honest_card(planted):
    suite, cls, members, tokens, texts, fa = planted
    tc = suite.transcoders[1]
    with torch.no_grad():
        saved = tc.b_enc[11].clone()
        tc.b_enc[11] = -1e4
    try:
        fa1 = collect_activations(suite, "mlp1", [11], tokens)
        card = scorecard(suite, fa1, 11, None, tokens, texts)
    finally:
        with torch.no_grad():
            tc.b_enc[11] = saved
    assert card["claimed_by"] == "never fires on these tokens" and card["token_class"] == ""
    assert card["specificity"] == 0.0 and card["sensitivity"] == 0.0 and card["ablation_positions"] == 0
