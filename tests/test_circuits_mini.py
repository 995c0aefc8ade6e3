"""The identities of docs/attribution.md on the embedded mini suite (float32, tolerance 1e-4). Marked slow."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from circuits.attribution import NodeIndex, attribute, direct_effects, reading_vectors
from circuits.graph import build_circuit
from circuits.linear_model import LinearisedModel
from circuits.qk import qk_decomposition
from circuits.targets import AttentionScoreTarget, parse_target
from circuits.trace import default_target
from saes.suite import MINI_DIR
from test_circuits_identities import frozen_real_run, read_real

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MINI_DIR / "cfg.json").is_file(), reason="the mini suite is not built (saes/mini/cfg.json)"),
]

PROMPT = "import os\nimport sys\n\ndef main(args):\n    for name in args:\n        print(name)\n"


@pytest.fixture(scope="module")
def lm():
    from saes.suite import load_suite

    suite = load_suite("mini")
    for p in suite.model.parameters():
        p.requires_grad_(False)
    return LinearisedModel(suite, suite.tokens(PROMPT))


def test_mini_linearised_logits(lm):
    clean = lm.model(lm.tokens)[0]
    got = lm.logits()[0]
    assert (got - clean).abs().max() <= 1e-4 * clean.abs().max()


def test_mini_completeness_and_intervention(lm):
    target = default_target(lm)
    a = attribute(lm, target, threshold=0.01, progress=False)
    assert a.max_relative_residual <= 1e-4
    circuit = build_circuit(lm, a, PROMPT, "mini")
    assert float(circuit.completeness_residuals().max()) <= 1e-4
    index = a.index
    A = direct_effects(lm, index, reading_vectors(lm, [target]))[0]
    base = read_real(lm, target, *frozen_real_run(lm))
    scale = float(A.abs().sum())
    for kind in ("embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error"):
        cols = [c for c in range(index.n) if index.kind(c) == kind and A[c] != 0]
        c = max(cols, key=lambda c: abs(float(A[c])))
        bump = (kind, index.layer(c), int(index.pos[c]), int(index.feature[c]))
        moved = read_real(lm, target, *frozen_real_run(lm, bump, 1.5)) - base
        assert abs(moved - 0.5 * float(A[c])) <= 1e-4 * scale, bump


def test_mini_logit_and_qk(lm):
    suite = lm.suite
    tok = lambda s: suite.model.tokenizer.encode(s, add_special_tokens=False)
    a, b = tok(" print")[0], tok(" import")[0]
    logit = parse_target(f"logit:#{a}-#{b}@-2", suite, lm.n_pos)
    assert attribute(lm, logit, threshold=0.01, progress=False).max_relative_residual <= 1e-4
    score = AttentionScoreTarget(2, 1, lm.n_pos - 1, lm.n_pos - 5)
    qk = qk_decomposition(lm, NodeIndex(lm), score)
    assert qk.relative_residual <= 1e-4
    assert float(qk.query_marginal.sum()) == pytest.approx(qk.score, abs=1e-4 * float(qk.pairs.abs().sum()))
    assert attribute(lm, score, threshold=0.01, progress=False).max_relative_residual <= 1e-4


def test_mini_batch_invariance_and_causality(lm):
    index = NodeIndex(lm)
    g = lm.feature_group("mlp_feature", lm.n_layers - 1)
    readers = [parse_target(f"mlp{lm.n_layers - 1}:{int(g.feature[p, 0])}@{p}", lm.suite, lm.n_pos) for p in (5, 9, 14)]
    together = direct_effects(lm, index, reading_vectors(lm, readers))
    for i, r in enumerate(readers):
        alone = direct_effects(lm, index, reading_vectors(lm, [r]))[0]
        assert torch.allclose(together[i], alone, atol=1e-6, rtol=1e-5)
        assert torch.all(alone[index.pos != r.pos] == 0)
        assert torch.all(alone[index.stage >= r.stage(lm)] == 0)
