"""Suites with some dictionaries only: the selection syntax, its errors, and traces of mini with partial suites.

The identities themselves are tested on every selection in ``test_circuits_identities.py``; here the parts
around them: ``parse_dictionaries`` / ``Suite.select`` / ``--dictionaries``, faithfulness splicing only what the
suite has, and the mini suite traced transcoders-only, attention-only and mixed (float32, tolerance 1e-4).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from circuits.attribution import attribute
from circuits.faithfulness import Ablation, ablation_keeping, run_spliced
from circuits.graph import build_circuit
from circuits.influence import graph_scores
from circuits.linear_model import LinearisedModel
from circuits.targets import LogitTarget
from saes.suite import MINI_DIR, parse_dictionaries
from saes.testing import make_suite

PROMPT = "import os\nfor i in range(3):"


def test_parse_dictionaries():
    assert parse_dictionaries("all", 4) == ({0, 1, 2, 3}, {0, 1, 2, 3})
    assert parse_dictionaries("none", 4) == (set(), set())
    assert parse_dictionaries("mlp", 4) == (set(), {0, 1, 2, 3})
    assert parse_dictionaries("attn", 2) == ({0, 1}, set())
    assert parse_dictionaries("attn0-2,mlp", 4) == ({0, 1, 2}, {0, 1, 2, 3})
    assert parse_dictionaries(" attn3 , mlp1-2 ", 4) == ({3}, {1, 2})
    for bad, words in (("", "empty"), ("mlp7", "4 layers"), ("attn3-1", "range is empty"), ("transcoders", "cannot parse"),
                       ("none,mlp", "cannot be combined"), ("mlp-1", "cannot parse")):
        with pytest.raises(ValueError, match=words):
            parse_dictionaries(bad, 4)


def test_select_keeps_the_named_dictionaries_and_refuses_missing_ones():
    suite = make_suite(n_layers=2, d_sae=16, seed=2)
    part = suite.select("attn1,mlp")
    assert list(part.dictionaries()) == ["mlp0", "attn1", "mlp1"]
    assert part.model is suite.model and part.transcoders[0] is suite.transcoders[0]
    assert part.info["dictionaries"] == "attn1,mlp"
    # a family named whole takes what the suite has; a layer named by number must exist
    assert list(part.select("attn").dictionaries()) == ["attn1"]
    with pytest.raises(ValueError, match="has no attn0"):
        part.select("attn0")


def test_cli_refuses_a_bad_spec_in_one_line(capsys):
    from scripts.cli import main

    rc = main(["trace", "--model", "mini", "--dictionaries", "mlp9-2", "--prompt", "x", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("circuits trace: error: --dictionaries") and "range is empty" in err


@pytest.mark.parametrize("selection", ["mlp", "attn", "attn1,mlp0", "none", "all+skip", "mlp+clt"])
def test_spliced_model_with_nothing_ablated_is_the_model(selection):
    """Faithfulness splices only the suite's dictionaries: with nothing ablated it is the model itself; with
    everything ablated a missing transcoder's whole MLP output is gone (it is one node per position). Skip
    transcoders and cross-layer transcoders are spliced too."""
    from test_circuits_identities import with_clt, with_skip

    spec, _, extra = selection.partition("+")
    suite = make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=3).select(spec)
    suite = with_skip(suite) if extra == "skip" else with_clt(suite) if extra == "clt" else suite
    lm = LinearisedModel(suite, suite.tokens(PROMPT))
    toks = suite.model.to_tokens(PROMPT)[0]
    target = LogitTarget((int(toks[3]), int(toks[5])), (1.0, -1.0), lm.n_pos - 1)
    assert run_spliced(lm, target, Ablation({}, {})) == pytest.approx(target.clean_value(lm), abs=1e-10)
    empty = ablation_keeping(lm, [])
    assert {k for k in empty.errors if k[0] == "mlp_output"} == {("mlp_output", l) for l in range(2)
                                                                  if l not in suite.transcoders and suite.clt is None}
    a = attribute(lm, target, threshold=0.0, progress=False)
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    kept_all = ablation_keeping(lm, [n for n in circuit.nodes() if n.kind != "target"])
    # every active node that can reach the target kept: only inactive features and later positions are ablated
    got = run_spliced(lm, target, kept_all)
    assert got == pytest.approx(target.clean_value(lm), abs=1e-8)
    assert run_spliced(lm, target, empty) != pytest.approx(target.clean_value(lm), abs=1e-6)


# ---------------------------------------------------------------------------------------------- mini
needs_mini = pytest.mark.skipif(not (MINI_DIR / "cfg.json").is_file(), reason="the mini suite is not built")
MINI_PROMPT = "import os\nimport sys\n\ndef main(args):\n"


@needs_mini
@pytest.mark.parametrize("selection", ["mlp", "attn0-1,mlp", "attn", "attn2-3,mlp0-1"])
def test_mini_partial_suites_trace_with_certificates(selection, one_torch_thread):
    from circuits.trace import trace
    from saes.suite import load_suite

    suite = load_suite("mini", dictionaries=selection)
    target = 'logit:" sys"@3' if "mlp" not in selection.split(",") and selection != "mlp" else None
    result = trace(suite, MINI_PROMPT, target=target or 'logit:"\\n"', threshold=0.005, faithfulness=False, progress=False)
    c = result.circuit
    assert c.max_relative_residual <= 1e-4
    assert float(c.completeness_residuals().max()) <= 1e-4
    kinds = c.counts()
    assert ("mlp_output" in kinds) == any(l not in suite.transcoders for l in range(4))
    assert "attn_feature" in kinds or not suite.attn_saes
    assert "attn_feature" not in kinds or suite.attn_saes
    assert 0 <= c.scores["replacement"] <= 1
    if len(suite.transcoders) == 4:  # with every MLP frozen instead, the MLP outputs take the embeddings' influence
        assert c.scores["replacement"] > 0


@pytest.mark.slow
def test_random_gpt2_shaped_partial_suites_certify(one_torch_thread):
    """GPT-2 small's shapes with random weights (the benchmark's suite, 2,048-feature dictionaries), full graphs of
    8 tokens with transcoders only, mixtures, and attention SAEs only: every reader's completeness within 1e-4."""
    from scripts.bench_attribution import gpt2_shaped_suite

    full = gpt2_shaped_suite(d_sae=2048, fire=20)
    tokens = torch.randint(0, full.model.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(1))
    for spec in ("mlp", "attn0-5,mlp", "attn", "attn3,mlp0-8"):
        lm = LinearisedModel(full.select(spec), tokens)
        target = LogitTarget((int(lm.clean_logits[-1].argmax()),), (1.0,), 7)
        a = attribute(lm, target, threshold=0.0, progress=False)
        assert a.max_relative_residual <= 1e-4
        kinds = {a.index.kind(int(c)) for c in a.reader_cols[1:].tolist()}
        assert kinds == {k for k, store in (("attn_feature", lm.suite.attn_saes), ("mlp_feature", lm.suite.transcoders)) if store}


@pytest.mark.parametrize("selection", ["all", "attn1,mlp0", "attn", "none", "mlp+clt"])
def test_default_target_is_the_deepest_active_feature_at_the_last_position(selection):
    from test_circuits_identities import with_clt

    from circuits.trace import default_target

    spec, _, extra = selection.partition("+")
    base = make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=3)
    suite = with_clt(base.select(spec)) if extra else base.select(spec)
    lm = LinearisedModel(suite, suite.tokens("import os\nfor i in range(3):"))
    last = lm.n_pos - 1
    active = {(g.kind, g.layer): g for g in lm.groups if g.is_feature and g.mask[last].any()}
    if not active:
        with pytest.raises(ValueError, match="give one with --target"):
            default_target(lm)
        return
    t = default_target(lm)
    mlp = [l for k, l in active if k == "mlp_feature"]
    kind, layer = ("mlp_feature", max(mlp)) if mlp else ("attn_feature", max(l for _, l in active))
    g = active[(kind, layer)]
    assert (t.kind, t.layer, t.pos) == (kind, layer, last)
    assert t.feature == int(g.feature[last][g.activation[last].argmax()])
