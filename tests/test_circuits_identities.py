"""Every identity of docs/attribution.md, on tiny random float64 models (tolerance 1e-9).

Interventions are made in the *real* TransformerLens model with hooks that freeze patterns and LayerNorm
scales and splice in the dictionaries with frozen activations, so they do not reuse the code under test.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from circuits.attribution import (ExactnessError, NodeIndex, attribute, direct_effects, edge_rows, kept_sources,
                                  reading_vectors)
from circuits.graph import build_circuit
from circuits.influence import graph_scores
from circuits.linear_model import LinearisedModel
from circuits.qk import qk_decomposition
from circuits.targets import AttentionScoreTarget, DirectionTarget, FeatureTarget, LogitTarget, read_targets
from saes.dictionary import DictionarySpec, build_dictionary, decode, encode
from saes.suite import Suite, flatten_z
from saes.testing import make_suite

PROMPT = "import os\nfor i in range(3):"
TOL = 1e-9


@pytest.fixture(scope="module")
def suite():
    return make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=3)


@pytest.fixture(scope="module")
def lm(suite):
    return LinearisedModel(suite, suite.tokens(PROMPT))


def active_feature(lm, kind, layer, pos=-1, rank=0):
    g = lm.feature_group(kind, layer)
    pos = pos % lm.n_pos
    order = g.activation[pos].argsort(descending=True)
    return FeatureTarget(kind, layer, int(g.feature[pos, order[rank]]), pos)


def targets_of(lm, suite):
    p = lm.n_pos - 1
    toks = suite.model.to_tokens(PROMPT)[0]
    return {
        "mlp1": active_feature(lm, "mlp_feature", 1),
        "attn1": active_feature(lm, "attn_feature", 1),
        "mlp0_mid": active_feature(lm, "mlp_feature", 0, pos=p - 3),
        "logit_diff": LogitTarget((int(toks[3]), int(toks[5])), (1.0, -1.0), p - 1),
        "score": AttentionScoreTarget(1, 1, p, p - 3),
        "direction": DirectionTarget("blocks.1.hook_resid_mid", p,
                                     tuple(torch.randn(lm.cfg.d_model, generator=torch.Generator().manual_seed(0)).tolist())),
    }


def rel(a, b, scale):
    return abs(a - b) / max(abs(scale), 1e-12)


# ---------------------------------------------------------------------------------- the linearised model
def test_linearised_model_gives_the_clean_logits(lm):
    clean = lm.model(lm.tokens)[0]
    for chain in (False, True):
        got = lm.logits(chain=chain)[0]
        assert torch.allclose(got, clean, atol=1e-10, rtol=0), f"chain={chain}: {(got - clean).abs().max()}"


def test_fixture_has_the_biases_that_could_break_things(suite, lm):
    attn = suite.model.blocks[1].attn
    assert attn.b_Q.abs().min() > 0 and attn.b_K.abs().min() > 0 and attn.b_O.abs().min() > 0
    assert suite.transcoders[0].b_dec.abs().min() > 0 and suite.attn_saes[0].b_enc.abs().min() > 0
    errors = [g for g in lm.groups if g.kind.endswith("error")]
    assert all(g.activation.max() > 1e-3 for g in errors), "random dictionaries should leave non-zero errors"


# ---------------------------------------------------------------------------------- 1. completeness
@pytest.mark.parametrize("name", ["mlp1", "attn1", "logit_diff", "score", "direction"])
def test_completeness_of_the_full_graph(lm, suite, name):
    target = targets_of(lm, suite)[name]
    a = attribute(lm, target, threshold=0.0, progress=False)
    assert a.max_relative_residual <= TOL
    assert torch.all(a.reader_remainder == 0), "at threshold 0 nothing that can reach a reader is dropped"
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    assert circuit.max_relative_residual == a.max_relative_residual
    assert float(circuit.completeness_residuals().max()) <= TOL
    # the target value is the real model's, not the linearised model's
    assert circuit.target_value == pytest.approx(target.clean_value(lm), abs=0)


def test_completeness_of_a_pruned_graph_uses_remainders(lm, suite):
    target = targets_of(lm, suite)["mlp1"]
    a = attribute(lm, target, threshold=0.05, progress=False)
    assert a.hierarchy.kept.sum() < a.index.n / 2
    assert a.reader_remainder.abs().max() > 1e-3, "pruning should leave a remainder somewhere"
    assert a.max_relative_residual <= TOL
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    assert float(circuit.completeness_residuals().max()) <= TOL


def test_the_certificate_can_fail(suite):
    """Break the frozen LayerNorm scale, or an error node: the check must raise, not absorb the difference."""
    target = None
    for corrupt in ("scale", "error"):
        lm = LinearisedModel(suite, suite.tokens(PROMPT))
        target = target or active_feature(lm, "mlp_feature", 1)
        if corrupt == "scale":
            lm.scale_ln2[1] *= 1.001
        else:
            lm.feature_group("mlp_error", 0).activation[-1] *= 1.01  # mlp0 error at the last position
        with pytest.raises(ExactnessError):
            attribute(lm, target, threshold=0.05, progress=False)


# ---------------------------------------------------------------------------------- 2. intervention
def frozen_real_run(lm, bump=None, factor=1.0):
    """The real model with patterns and LN scales frozen and dictionaries spliced with frozen activations.

    ``bump``: (kind, layer, pos, feature) of one node whose activation is multiplied by ``factor``.
    Returns the logits and the hook values captured *before* splicing.
    """
    suite, model, c = lm.suite, lm.model, lm.cache
    seen = {}

    def is_bumped(kind, layer, pos):
        return bump is not None and bump[0] == kind and bump[1] == layer and bump[2] == pos

    def scale_hook(x, hook):
        return c[hook.name][None]

    def pattern_hook(x, hook):
        return c[hook.name][None]

    def embed_hook(x, hook):
        kind = "embed" if hook.name == "hook_embed" else "pos_embed"
        x = x.clone()
        if bump is not None and bump[0] == kind:
            x[:, bump[2]] *= factor
        return x

    def z_hook(z, hook):
        layer = hook.layer()
        seen[hook.name] = flatten_z(z[0])
        sae = suite.attn_saes[layer]
        clean = flatten_z(c[hook.name])
        acts = encode(sae, clean).clone()
        err = clean - decode(sae, acts)
        if bump is not None and bump[0] == "attn_feature" and bump[1] == layer:
            acts[bump[2], bump[3]] *= factor
        if is_bumped("attn_error", layer, bump[2] if bump else -1):
            err[bump[2]] *= factor
        return (decode(sae, acts) + err).reshape(z.shape)

    def mlp_hook(out, hook):
        layer = hook.layer()
        tc = suite.transcoders[layer]
        x = c[f"blocks.{layer}.ln2.hook_normalized"]
        acts = encode(tc, x).clone()
        err = c[hook.name] - decode(tc, acts)
        if bump is not None and bump[0] == "mlp_feature" and bump[1] == layer:
            acts[bump[2], bump[3]] *= factor
        if is_bumped("mlp_error", layer, bump[2] if bump else -1):
            err[bump[2]] *= factor
        return (decode(tc, acts) + err)[None]

    def capture(x, hook):
        seen[hook.name] = x[0]

    hooks = [("hook_embed", embed_hook), ("hook_pos_embed", embed_hook), ("ln_final.hook_scale", scale_hook)]
    for l in range(lm.n_layers):
        hooks += [(f"blocks.{l}.ln1.hook_scale", scale_hook), (f"blocks.{l}.ln2.hook_scale", scale_hook),
                  (f"blocks.{l}.attn.hook_pattern", pattern_hook), (f"blocks.{l}.attn.hook_z", z_hook),
                  (f"blocks.{l}.ln2.hook_normalized", capture), (f"blocks.{l}.hook_mlp_out", mlp_hook),
                  (f"blocks.{l}.hook_resid_mid", capture)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(lm.tokens)[0]
    return logits, seen


def read_real(lm, target, logits, seen):
    if isinstance(target, LogitTarget):
        return float(sum(c * logits[target.pos, t] for t, c in zip(target.tokens, target.coefficients)))
    if isinstance(target, DirectionTarget):
        return float(seen[target.hook][target.pos] @ torch.tensor(target.direction, dtype=torch.float64))
    sae = lm.dictionary(target.kind, target.layer)
    hook = f"blocks.{target.layer}.attn.hook_z" if target.kind == "attn_feature" else f"blocks.{target.layer}.ln2.hook_normalized"
    x = seen[hook][target.pos]
    return float(x @ sae.W_enc[:, target.feature] + sae.b_enc[target.feature])


@pytest.mark.parametrize("name", ["mlp1", "attn1", "logit_diff", "direction"])
def test_intervention_moves_each_target_by_its_edge(lm, suite, name):
    target = targets_of(lm, suite)[name]
    index = NodeIndex(lm)
    A = direct_effects(lm, index, reading_vectors(lm, [target]))[0]
    logits, seen = frozen_real_run(lm)
    base = read_real(lm, target, logits, seen)
    assert base == pytest.approx(target.clean_value(lm), rel=1e-10)
    # the largest sources of each kind, plus one source that cannot reach the target (a later position)
    cols = []
    for kind in ("embed", "pos_embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error"):
        sel = [c for c in range(index.n) if index.kind(c) == kind and index.stage[c] < target.stage(lm) and A[c] != 0]
        cols += sorted(sel, key=lambda c: -abs(float(A[c])))[:2]
    assert len(cols) >= 8
    eps = 0.37
    for c in cols:
        bump = (index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c]))
        moved = read_real(lm, target, *frozen_real_run(lm, bump, 1 + eps)) - base
        assert moved == pytest.approx(eps * float(A[c]), abs=1e-9 * max(1.0, abs(base))), bump


def test_qk_pairs_move_the_score_under_intervention(lm, suite):
    """For a node on one side only, scaling it by (1+e) moves the score by e times its marginal (exactly)."""
    target = targets_of(lm, suite)["score"]
    index = NodeIndex(lm)
    qk = qk_decomposition(lm, index, target)
    base = target.clean_value(lm)
    for side, cols, marginal in (("query", qk.query_cols, qk.query_marginal), ("key", qk.key_cols, qk.key_marginal)):
        for j in sorted(range(len(cols)), key=lambda j: -abs(float(marginal[j])))[:3]:
            c = int(cols[j])
            bump = (index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c]))
            model_hooks = frozen_real_run_scores(lm, bump, 1.5)
            moved = float(model_hooks[target.head, target.query_pos, target.key_pos]) - base
            assert moved == pytest.approx(0.5 * float(marginal[j]), abs=1e-9), (side, bump)


def frozen_real_run_scores(lm, bump, factor):
    layer_scores = {}

    def grab(x, hook):
        layer_scores[hook.name] = x[0]

    name = "blocks.1.attn.hook_attn_scores"
    with lm.model.hooks(fwd_hooks=[(name, grab)]):
        frozen_real_run(lm, bump, factor)
    return layer_scores[name]


# ---------------------------------------------------------------------------------- 3. linearity
def _delta_leaves(lm):
    return {i: torch.zeros(1, lm.n_pos, g.width, dtype=lm.dtype, requires_grad=True) for i, g in enumerate(lm.groups)}


def test_second_derivative_is_zero_in_the_linearised_model_but_not_the_real_one(lm, suite):
    target = targets_of(lm, suite)["logit_diff"]
    delta = _delta_leaves(lm)
    h = read_targets(lm, [target], lm.residual(lm.final_stage, delta, chain=True))[0]
    leaves = list(delta.values())
    grads = torch.autograd.grad(h, leaves, create_graph=True, allow_unused=True)
    v = [torch.randn_like(x) for x in leaves]
    dot = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None and g.requires_grad)
    if isinstance(dot, torch.Tensor):
        hvp = torch.autograd.grad(dot, leaves, allow_unused=True)
        assert all(x is None or x.abs().max() == 0 for x in hvp)
    # The same probe on the real model (patterns, LayerNorm and features live) sees curvature.
    emb = torch.zeros(1, lm.n_pos, lm.cfg.d_model, dtype=lm.dtype, requires_grad=True)
    with lm.model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: x + emb)]):
        logits = lm.model(lm.tokens)[0]
    h_real = sum(c * logits[target.pos, t] for t, c in zip(target.tokens, target.coefficients))
    (g,) = torch.autograd.grad(h_real, emb, create_graph=True)
    (hvp_real,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), emb)
    assert hvp_real.abs().max() > 1e-6


def test_hierarchical_attribution_at_threshold_zero_is_the_total_effect(lm, suite):
    for name in ("mlp1", "attn1", "logit_diff"):
        target = targets_of(lm, suite)[name]
        a = attribute(lm, target, threshold=0.0, progress=False)
        delta = _delta_leaves(lm)
        h = read_targets(lm, [target], lm.residual(target.stage(lm), delta, chain=True))[0]
        grads = torch.autograd.grad(h, list(delta.values()), allow_unused=True)
        for i, g in enumerate(grads):
            cols = a.index.columns(i)
            if g is None:
                assert torch.all(a.hierarchy.influence[cols] == 0)
                continue
            total = (g[0] * lm.groups[i].activation).flatten()[a.index.flat[i]]
            assert torch.allclose(a.hierarchy.influence[cols], total, atol=1e-9 * max(1.0, abs(a.hierarchy.target_value))), (name, i)


def test_hierarchical_recursion_holds_on_a_pruned_graph(lm, suite):
    """T_s = A[t, s] + sum over kept k downstream of (T_k / a_k) A[k, s], read off the circuit's own edges."""
    target = targets_of(lm, suite)["mlp1"]
    circuit = build_circuit(lm, attribute(lm, target, threshold=0.03, progress=False), PROMPT, suite.name)
    nodes = {n.id: n for n in circuit.nodes()}
    recon = {nid: 0.0 for nid in nodes}
    for e in circuit.edges():
        dst = nodes[e.target]
        factor = 1.0 if dst.kind == "target" else dst.attribution / dst.activation
        recon[e.source] += factor * e.weight
    for nid, n in nodes.items():
        if n.kind != "target":
            assert recon[nid] == pytest.approx(n.attribution, abs=1e-9 * abs(circuit.target_value)), nid
            assert abs(n.attribution) >= 0.03 * abs(circuit.target_value) * (1 - 1e-12)


# ---------------------------------------------------------------------------------- 4. causality
def test_causality(lm, suite):
    target = targets_of(lm, suite)["logit_diff"]
    a = attribute(lm, target, threshold=0.0, progress=False)
    index = a.index
    stage_of = lambda c: int(index.stage[c])
    for s, d in zip(a.edge_src.tolist(), a.edge_dst.tolist()):
        col = int(a.reader_cols[d])
        if col < 0:
            assert index.pos[s] <= target.pos
            continue
        assert stage_of(s) < stage_of(col)
        assert index.pos[s] <= index.pos[col]
        if index.kind(col) == "mlp_feature":
            assert index.pos[s] == index.pos[col], "only attention moves information across positions"
        if index.kind(col) == "attn_feature":
            assert not (index.kind(s) in ("mlp_feature", "mlp_error") and index.layer(s) == index.layer(col))
    # and the zeros are exact zeros in the rows of A
    reader = active_feature(lm, "mlp_feature", 1, pos=lm.n_pos - 4)
    row = direct_effects(lm, index, reading_vectors(lm, [reader]))[0]
    assert torch.all(row[index.pos != reader.pos] == 0)
    assert torch.all(row[index.stage >= reader.stage(lm)] == 0)


# ---------------------------------------------------------------------------------- 5. batch invariance
def test_rows_do_not_depend_on_batch_size_or_order(lm, suite):
    index = NodeIndex(lm)
    readers = list(targets_of(lm, suite).values())[:-2] + [active_feature(lm, "attn_feature", 0, rank=r) for r in range(3)]
    together = direct_effects(lm, index, reading_vectors(lm, readers))
    perm = [3, 0, 5, 1, 6, 2, 4][: len(readers)]
    shuffled = direct_effects(lm, index, reading_vectors(lm, [readers[i] for i in perm]))
    for j, i in enumerate(perm):
        alone = direct_effects(lm, index, reading_vectors(lm, [readers[i]]))[0]
        assert torch.allclose(together[i], alone, atol=1e-12, rtol=1e-10)
        assert torch.allclose(shuffled[j], alone, atol=1e-12, rtol=1e-10)
    target = readers[0]
    small = attribute(lm, target, threshold=0.02, batch_size=1, progress=False)
    big = attribute(lm, target, threshold=0.02, batch_size=512, progress=False)
    assert torch.equal(small.edge_src, big.edge_src) and torch.equal(small.edge_dst, big.edge_dst)
    assert torch.allclose(small.edge_weight, big.edge_weight, atol=1e-12, rtol=1e-10)


def test_closed_form_reading_vectors_equal_a_real_backward_pass(lm, suite):
    """The feature readers' closed form (no autograd) against autograd through ``read_targets``, per head too."""
    readers = ([active_feature(lm, kind, layer, rank=r) for kind in ("mlp_feature", "attn_feature")
                for layer in range(lm.n_layers) for r in range(2)]
               + [active_feature(lm, "mlp_feature", 0, pos=1), active_feature(lm, "attn_feature", 1, pos=2)])
    readers.append(FeatureTarget("attn_feature", 1, readers[-1].feature, readers[-1].pos, head=1))
    closed, real = reading_vectors(lm, readers), reading_vectors(lm, readers, autograd=True)
    assert closed.g.abs().max() > 0
    assert torch.allclose(closed.g, real.g, atol=1e-12, rtol=1e-10)
    assert torch.allclose(closed.constant, real.constant, atol=1e-12, rtol=1e-10)
    assert torch.equal(closed.stage, real.stage)


def test_edge_rows_equal_the_full_rows_of_A(lm, suite):
    """The edge step (kept sources only, compact reading vectors, one product per position read, dropped writes
    summed by stage) against full rows of A over every node: kept columns equal, remainder = the sum over the
    dropped columns."""
    index = NodeIndex(lm)
    kept = torch.rand(index.n, generator=torch.Generator().manual_seed(1)) < 0.4
    sources = kept_sources(lm, index, kept)
    readers = [r for name, r in targets_of(lm, suite).items() if name != "mlp0_mid"]
    readers += [active_feature(lm, kind, layer, pos=p, rank=r) for kind in ("mlp_feature", "attn_feature")
                for layer in range(lm.n_layers) for p in (2, -1) for r in range(2)]
    readers.append(FeatureTarget("attn_feature", 1, readers[-1].feature, readers[-1].pos, head=0))
    full = direct_effects(lm, index, reading_vectors(lm, readers, autograd=True))
    cols = sources.cols
    dropped = torch.ones(index.n, dtype=torch.bool)
    dropped[cols] = False
    for autograd in (False, True):
        for batch in (len(readers), 5, 1):
            for start in range(0, len(readers), batch):
                chunk = readers[start : start + batch]
                e = edge_rows(lm, sources, chunk, autograd=autograd)
                expect = full[start : start + len(chunk)]
                assert torch.allclose(e.kept, expect[:, cols], atol=1e-12, rtol=1e-10), (autograd, batch, start)
                assert torch.allclose(e.remainder, expect[:, dropped].sum(-1), atol=1e-12, rtol=1e-10)
    assert full[:, cols].abs().max() > 0 and full[:, dropped].abs().max() > 0


# ---------------------------------------------------------------------------------- 6. error-free limit
def exact_suite(seed=0):
    """Attention SAEs [I, -I] (relu(x) - relu(-x) = x) and transcoders that are the (ReLU) MLPs themselves."""
    base = make_suite(n_layers=2, dtype=torch.float64, seed=seed)
    model = base.model
    attn, mlp = {}, {}
    for layer, block in enumerate(model.blocks):
        block.mlp.act_fn = torch.relu  # so that a ReLU transcoder can be the MLP exactly
        d = model.cfg.n_heads * model.cfg.d_head
        sae = build_dictionary(DictionarySpec.attn_sae(layer, d, 2 * d, model_name=model.cfg.model_name), dtype=torch.float64)
        tc = build_dictionary(DictionarySpec.transcoder(layer, model.cfg.d_model, model.cfg.d_mlp, model_name=model.cfg.model_name),
                              dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64)
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([eye, -eye], 1))
            sae.W_dec.copy_(torch.cat([eye, -eye], 0))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
            tc.W_enc.copy_(block.mlp.W_in)
            tc.b_enc.copy_(block.mlp.b_in)
            tc.W_dec.copy_(block.mlp.W_out)
            tc.b_dec.copy_(block.mlp.b_out)
        attn[layer], mlp[layer] = sae, tc
    return Suite(name="exact", model=model, attn_saes=attn, transcoders=mlp)


def test_error_free_limit():
    suite = exact_suite()
    lm = LinearisedModel(suite, suite.tokens(PROMPT))
    errors = [g for g in lm.groups if g.kind.endswith("error")]
    assert max(float(g.activation.max()) for g in errors) < 1e-12
    assert all(g.n_nodes == 0 or g.activation.max() < 1e-12 for g in errors)
    target = active_feature(lm, "mlp_feature", 1)
    a = attribute(lm, target, threshold=0.0, progress=False)
    assert a.max_relative_residual <= TOL
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    assert all(abs(n.attribution) < 1e-12 for n in circuit.nodes() if n.kind.endswith("error"))
    assert graph_scores(circuit)["replacement"] == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------- 7. QK
def test_qk_pairs_sum_to_the_score_with_biases_and_positions(lm, suite):
    target = targets_of(lm, suite)["score"]
    index = NodeIndex(lm)
    qk = qk_decomposition(lm, index, target)
    S = target.clean_value(lm)
    assert float(qk.pairs.sum()) == pytest.approx(S, abs=TOL * max(1, abs(S)))
    assert qk.relative_residual <= TOL
    # the marginals against independent computations from the real model's q and k
    attn = lm.model.blocks[target.layer].attn
    q_clean = lm.cache[f"blocks.{target.layer}.attn.hook_q"][target.query_pos, target.head]
    k_clean = lm.cache[f"blocks.{target.layer}.attn.hook_k"][target.key_pos, target.head]
    scale = lm.scale_ln1[target.layer]
    for cols, pos, marginal, W, other in ((qk.query_cols, target.query_pos, qk.query_marginal, attn.W_Q[target.head], k_clean),
                                          (qk.key_cols, target.key_pos, qk.key_marginal, attn.W_K[target.head], q_clean)):
        writes = index.unit_writes(cols) * index.activation[cols][:, None]
        centred = writes - writes.mean(-1, keepdim=True)
        expect = (centred / scale[pos]) @ W @ other / lm.cfg.attn_scale
        assert torch.allclose(marginal[:-1], expect, atol=1e-10)
        assert float(marginal.sum()) == pytest.approx(S, abs=1e-9)
        kinds = {index.kind(int(c)) for c in cols}
        assert {"pos_embed", "embed"} <= kinds
    # the bias entries matter: dropping b_Q from the constant row would break the sum
    b_part = (attn.b_Q[target.head].detach() @ k_clean) / lm.cfg.attn_scale
    assert abs(float(b_part)) > 1e-3
    # the graph's in-edges of the score target are the half-sum of the two marginals
    a = attribute(lm, target, threshold=0.0, progress=False)
    into_target = {int(s): float(w) for s, d, w in zip(a.edge_src, a.edge_dst, a.edge_weight) if d == 0}
    half = {}
    for cols, marginal in ((qk.query_cols, qk.query_marginal), (qk.key_cols, qk.key_marginal)):
        for c, m in zip(cols.tolist(), marginal[:-1].tolist()):
            half[c] = half.get(c, 0.0) + m / 2
    for c, w in into_target.items():
        assert w == pytest.approx(half[c], abs=1e-9)
    # gradient-times-input through both sides double counts: it sums to about 2S, not S
    both = sum(half.values()) * 2 + float(qk.query_marginal[-1] + qk.key_marginal[-1])
    assert both == pytest.approx(2 * S, abs=1e-9)


# ---------------------------------------------------------------------------------- float32 and TopK
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 6), ("jumprelu", None)])
def test_float32_and_topk_within_1e_4(activation, k):
    suite = make_suite(n_layers=2, dtype=torch.float32, activation=activation, k=k, seed=1)
    lm = LinearisedModel(suite, suite.tokens(PROMPT))
    if activation == "topk":
        assert max(int(g.mask.sum(-1).max()) for g in lm.groups if g.is_feature) <= k
    if activation == "jumprelu":  # a feature is a node exactly where its pre-activation passes its threshold
        g, sae = lm.feature_group("mlp_feature", 1), suite.transcoders[1]
        _, cache = suite.model.run_with_cache(suite.tokens(PROMPT), names_filter="blocks.1.ln2.hook_normalized")
        pre = cache["blocks.1.ln2.hook_normalized"][0] @ sae.W_enc + sae.b_enc
        passed = pre > sae.threshold
        assert g.n_nodes == int(passed.sum()) < int((pre > 0).sum())  # some positive pre-activations stay below
        assert bool((g.clean_pre[g.mask] > sae.threshold[g.feature[g.mask]]).all())
    assert torch.allclose(lm.logits()[0], lm.clean_logits, atol=1e-4 * float(lm.clean_logits.abs().max()))
    a = attribute(lm, active_feature(lm, "mlp_feature", 1), threshold=0.01, progress=False)
    assert a.max_relative_residual <= 1e-4


def test_the_cached_feature_major_encoder_follows_the_dictionary():
    """Attribution gathers encoder columns from a cached copy of ``W_enc.T``: a dictionary changed after a trace
    (in place, or given new storage) must be read as it is now, so the next trace still certifies; the copy goes
    with its encoder."""
    import gc

    from circuits.linear_model import _BY_FEATURE, encoder_by_feature

    suite = make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=4)
    lm = LinearisedModel(suite, suite.tokens(PROMPT))
    target = active_feature(lm, "mlp_feature", 1)
    attribute(lm, target, threshold=0.0, progress=False)
    tc, sae = suite.transcoders[1], suite.attn_saes[1]
    with torch.no_grad():
        tc.W_enc.mul_(1.5)  # in place: same storage, new version
        sae.W_enc.data = sae.W_enc.data * 0.5 + 0.01  # new storage
    for d in (tc, sae, suite.transcoders[0], suite.attn_saes[0]):
        assert torch.equal(encoder_by_feature(d), d.W_enc.T)
    lm = LinearisedModel(suite, suite.tokens(PROMPT))
    a = attribute(lm, active_feature(lm, "mlp_feature", 1), threshold=0.0, progress=False)
    assert a.max_relative_residual < TOL
    n = len(_BY_FEATURE)
    del suite, lm, a, tc, sae, d
    gc.collect()
    assert len(_BY_FEATURE) <= n - 4  # the four encoders of this suite are gone, and so are their copies
