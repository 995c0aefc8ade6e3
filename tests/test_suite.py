"""Suites: a dictionary that does not fit its model is refused with the side named; prompts are checked."""

import pytest

from saes.suite import Suite, load_suite
from saes.testing import make_dictionary, make_model, make_suite


def test_tiny_suite_orders_dictionaries_like_the_forward_pass():
    suite = make_suite(n_layers=2)
    assert list(suite.dictionaries()) == ["attn0", "mlp0", "attn1", "mlp1"]
    with pytest.raises(KeyError, match="has no dictionary 'mlp7'"):
        suite.dictionary("mlp7")


def test_wrong_width_is_refused_naming_the_side():
    model = make_model(d_model=16)
    other = make_model(d_model=24, n_heads=3)
    with pytest.raises(ValueError, match="input width is 24 .* width 16"):
        Suite("x", model, {}, {0: make_dictionary(other, "transcoder", 0)})


def test_missing_hook_is_refused():
    model = make_model(n_layers=1)
    deep = make_dictionary(make_model(n_layers=3), "attn_sae", 2)
    with pytest.raises(ValueError, match="does not have"):
        Suite("x", model, {2: deep}, {})


def test_prompts_are_checked():
    suite = make_suite(n_layers=1)
    with pytest.raises(ValueError, match="empty"):
        suite.tokens("   ")
    with pytest.raises(ValueError, match="context"):
        suite.tokens("import os " * 200)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="mini, gpt2-small"):
        load_suite("gpt5")
