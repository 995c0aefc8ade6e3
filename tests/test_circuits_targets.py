"""The target text form: what parses to what, and the errors that say how to fix a spec."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from circuits.targets import AttentionScoreTarget, FeatureTarget, LogitTarget, parse_target
from saes.testing import make_suite

N_POS = 10


@pytest.fixture(scope="module")
def suite():
    return make_suite(n_layers=2, d_sae=64)


def one_token(suite, text):
    ids = suite.model.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_valid_specs(suite):
    assert parse_target("mlp1:17@3", suite, N_POS) == FeatureTarget("mlp_feature", 1, 17, 3)
    assert parse_target("attn0:63@-1", suite, N_POS) == FeatureTarget("attn_feature", 0, 63, N_POS - 1)
    assert parse_target("mlp0:5", suite, N_POS).pos == N_POS - 1
    assert parse_target("attn1.1:7->2", suite, N_POS) == AttentionScoreTarget(1, 1, 7, 2)
    t = parse_target('logit:"import"', suite, N_POS)
    assert isinstance(t, LogitTarget) and t.tokens == (one_token(suite, "import"),) and t.pos == N_POS - 1
    d = parse_target('logit:"import"-"\\n"@4', suite, N_POS)
    assert d.tokens == (one_token(suite, "import"), one_token(suite, "\n")) and d.coefficients == (1.0, -1.0) and d.pos == 4
    assert parse_target("logit:#12-#13@0", suite, N_POS).tokens == (12, 13)


@pytest.mark.parametrize("spec,message", [
    ("mlp1:64@3", r"feature 64 is out of range for mlp1, which has 64 features: use 0\.\.63"),
    ("attn0:-2", r"feature -2 is out of range for attn0"),
    ("mlp2:3@1", r"layer 2 does not exist: the model has 2 layers, use 0\.\.1"),
    ("attn7.0:3->1", r"layer 7 does not exist"),
    ("mlp0:3@10", r"position 10 is out of range: the prompt has 10 tokens .* use a position in 0\.\.9"),
    ("mlp0:3@-11", r"position -11 is out of range"),
    ("attn1.2:3->1", r"head 2 does not exist: layer 1 has 2 heads, use 0\.\.1"),
    ("attn1.0:3->5", r"key position 5 is after query position 3: attention is causal"),
    ("attn1.0:12->5", r"query position 12 is out of range"),
    ('logit:"zzqxj unknown words"', r"is not one token \(it tokenises as .*\); choose a single token.*logit:#ID"),
    ("logit:#99999", r"token id 99999 is out of range: the vocabulary has \d+ tokens"),
    ('logit:"import"-"import"', r"with itself is always 0"),
    ("neuron5", r"cannot parse target 'neuron5'; target syntax"),
])
def test_errors_name_the_fix(suite, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_target(spec, suite, N_POS)
