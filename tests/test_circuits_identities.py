"""Every identity of docs/attribution.md, on tiny random float64 models (tolerance 1e-9).

Each runs on the complete suite and on partial ones (``SELECTIONS``): transcoders only (every attention layer
passes through), attention SAEs only (every MLP output one frozen node per position), and two mixtures, one of
which puts a pass-through attention layer below an attention SAE.

Interventions are made in the *real* TransformerLens model with hooks that freeze patterns and LayerNorm
scales and splice in the dictionaries with frozen activations, so they do not reuse the code under test. A
layer without an attention SAE runs its real attention (pattern and scale frozen); a layer without a
transcoder has its MLP output frozen at the clean value.
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from circuits.attribution import (ExactnessError, NodeIndex, _edge_rows_descending, attribute, direct_effects, edge_rows,
                                  kept_sources, reading_vectors)
from circuits.graph import build_circuit
from circuits.influence import graph_scores
from circuits.linear_model import LinearisedModel, attn_stage, mlp_stage
from circuits.qk import qk_decomposition
from circuits.targets import AttentionScoreTarget, DirectionTarget, FeatureTarget, LogitTarget, read_targets
from saes.dictionary import DictionarySpec, build_dictionary, decode, encode
from saes.suite import Suite, flatten_z
from saes.testing import make_suite

PROMPT = "import os\nfor i in range(3):"
TOL = 1e-9
SELECTIONS = ["all", "mlp", "attn", "attn1,mlp0", "attn0,mlp1", "all+skip", "mlp+skip", "all+clt", "mlp+clt"]


@pytest.fixture(scope="module")
def full_suite():
    suite = make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=3)
    # Processing folds b_V into b_O; put a b_V back so that its path through pass-through attention is exercised.
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in suite.model.blocks:
            block.attn.b_V.copy_(0.1 * torch.randn(block.attn.b_V.shape, generator=gen, dtype=torch.float64))
    return suite


def with_skip(suite, seed=11):
    """The suite with copies of its transcoders given a random ``W_skip`` (``[d_out, d_in]``, sae-lens's layout)."""
    gen = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer, tc in suite.transcoders.items():
        tc = copy.deepcopy(tc)
        W = 0.3 * torch.randn(tc.W_dec.shape[1], tc.W_enc.shape[0], generator=gen, dtype=tc.W_dec.dtype)
        tc.W_skip = torch.nn.Parameter(W, requires_grad=False)
        transcoders[layer] = tc
    return Suite(name=suite.name + "-skip", model=suite.model, attn_saes=dict(suite.attn_saes), transcoders=transcoders,
                 info=suite.info)


def with_clt(suite, d_sae=24, seed=12):
    """The suite with a random cross-layer transcoder (ReLU, random biases) in place of its transcoders."""
    from saes.clt import CLTConfig, CrossLayerTranscoder

    cfg = suite.model.cfg
    clt = CrossLayerTranscoder(CLTConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, d_sae=d_sae), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / cfg.d_model**0.5)
        clt.b_enc.add_(0.1)  # so that about half the features fire
    for p in clt.parameters():
        p.requires_grad_(False)
    return Suite(name=suite.name + "-clt", model=suite.model, attn_saes=dict(suite.attn_saes), transcoders={},
                 info=suite.info, clt=clt)


@pytest.fixture(scope="module", params=SELECTIONS)
def suite(request, full_suite):
    spec, _, extra = request.param.partition("+")
    part = full_suite.select(spec)
    return with_skip(part) if extra == "skip" else with_clt(part) if extra == "clt" else part


@pytest.fixture(scope="module")
def lm(suite):
    return LinearisedModel(suite, suite.tokens(PROMPT))


def active_feature(lm, kind, layer, pos=-1, rank=0):
    g = lm.feature_group(kind, layer)
    pos = pos % lm.n_pos
    order = g.activation[pos].argsort(descending=True)
    return FeatureTarget(kind, layer, int(g.feature[pos, order[rank]]), pos)


def has(suite, kind, layer):
    if kind != "attn_feature" and suite.clt is not None:
        return True
    return layer in (suite.attn_saes if kind == "attn_feature" else suite.transcoders)


def present(suite):
    """(kind, layer) of every dictionary of the suite."""
    return [(kind, layer) for layer in range(suite.n_layers) for kind in ("attn_feature", "mlp_feature")
            if has(suite, kind, layer)]


def targets_of(lm, suite):
    p = lm.n_pos - 1
    toks = suite.model.to_tokens(PROMPT)[0]
    features = {}
    if has(suite, "mlp_feature", 1):
        features["mlp1"] = active_feature(lm, "mlp_feature", 1)
    if has(suite, "attn_feature", 1):
        features["attn1"] = active_feature(lm, "attn_feature", 1)
    if has(suite, "mlp_feature", 0):
        features["mlp0_mid"] = active_feature(lm, "mlp_feature", 0, pos=p - 3)
    return {
        **features,
        "logit_diff": LogitTarget((int(toks[3]), int(toks[5])), (1.0, -1.0), p - 1),
        "score": AttentionScoreTarget(1, 1, p, p - 3),
        "direction": DirectionTarget("blocks.1.hook_resid_mid", p,
                                     tuple(torch.randn(lm.cfg.d_model, generator=torch.Generator().manual_seed(0)).tolist())),
    }


def target_named(lm, suite, name):
    found = targets_of(lm, suite)
    if name not in found:
        pytest.skip(f"{name} needs a dictionary this selection lacks")
    return found[name]


def rel(a, b, scale):
    return abs(a - b) / max(abs(scale), 1e-12)


def pass_through_below(lm, stage):
    """Whether an attention layer below ``stage`` passes through (odd stages; even ones are skip paths)."""
    return any(t < stage and t % 2 == 1 for t in lm.linear_stages)


# ---------------------------------------------------------------------------------- the linearised model
def test_linearised_model_gives_the_clean_logits(lm):
    clean = lm.model(lm.tokens)[0]
    for chain in (False, True):
        got = lm.logits(chain=chain)[0]
        assert torch.allclose(got, clean, atol=1e-10, rtol=0), f"chain={chain}: {(got - clean).abs().max()}"


def test_fixture_has_the_biases_that_could_break_things(full_suite, suite, lm):
    attn = suite.model.blocks[1].attn
    assert attn.b_Q.abs().min() > 0 and attn.b_K.abs().min() > 0 and attn.b_O.abs().min() > 0
    assert attn.b_V.abs().min() > 0, "b_V reaches the residual stream through a pass-through attention layer"
    assert full_suite.transcoders[0].b_dec.abs().min() > 0 and full_suite.attn_saes[0].b_enc.abs().min() > 0
    errors = [g for g in lm.groups if g.kind.endswith("error") or g.kind == "mlp_output"]
    assert errors and all(g.activation.max() > 1e-3 for g in errors), "random dictionaries should leave non-zero errors"


def test_partial_suites_have_the_nodes_they_should(suite, lm):
    """Pass-through attention has no nodes; an MLP without a transcoder is one ``mlp_output`` node per position; a
    cross-layer transcoder's features of layer l write into every MLP output from l on."""
    if suite.clt is not None:
        assert sorted(t for _, t, _ in lm.extra_writes) == sorted(mlp_stage(L) for l in range(lm.n_layers)
                                                                  for L in range(l + 1, lm.n_layers))
    for layer in range(lm.n_layers):
        kinds = {g.kind for g in lm.groups if g.layer == layer}
        assert ({"attn_feature", "attn_error"} <= kinds) == has(suite, "attn_feature", layer)
        assert (attn_stage(layer) in lm.linear_stages) == (not has(suite, "attn_feature", layer))
        if has(suite, "mlp_feature", layer):
            assert {"mlp_feature", "mlp_error"} <= kinds and "mlp_output" not in kinds
        else:
            out = lm.feature_group("mlp_output", layer)
            clean = lm.cache[f"blocks.{layer}.hook_mlp_out"]
            assert torch.allclose(out.activation[:, 0, None] * out.direction[:, 0], clean, atol=1e-12)


# ---------------------------------------------------------------------------------- 1. completeness
@pytest.mark.parametrize("name", ["mlp1", "attn1", "logit_diff", "score", "direction"])
def test_completeness_of_the_full_graph(lm, suite, name):
    target = target_named(lm, suite, name)
    a = attribute(lm, target, threshold=0.0, progress=False)
    assert a.max_relative_residual <= TOL
    assert torch.all(a.reader_remainder == 0), "at threshold 0 nothing that can reach a reader is dropped"
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    assert circuit.max_relative_residual == a.max_relative_residual
    assert float(circuit.completeness_residuals().max()) <= TOL
    # the target value is the real model's, not the linearised model's
    assert circuit.target_value == pytest.approx(target.clean_value(lm), abs=0)


def test_completeness_of_a_pruned_graph_uses_remainders(lm, suite):
    target = targets_of(lm, suite).get("mlp1") or targets_of(lm, suite)["logit_diff"]
    a = attribute(lm, target, threshold=0.05, progress=False)
    assert a.hierarchy.kept.sum() < a.index.n / 2
    assert a.reader_remainder.abs().max() > 1e-3, "pruning should leave a remainder somewhere"
    assert a.max_relative_residual <= TOL
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    assert float(circuit.completeness_residuals().max()) <= TOL


def test_the_certificate_can_fail(suite):
    """Break a frozen LayerNorm scale (LN2, or LN1 of a pass-through layer), or an error node: the check must
    raise, not absorb the difference."""
    target = None
    corruptions = ["scale", "error"] + (["pass_through"] if suite.n_layers - 1 not in suite.attn_saes else [])
    for corrupt in corruptions:
        lm = LinearisedModel(suite, suite.tokens(PROMPT))
        target = target or targets_of(lm, suite).get("mlp1") or targets_of(lm, suite)["logit_diff"]
        if corrupt == "scale":
            lm.scale_ln2[1] *= 1.001
            if not has(suite, "mlp_feature", 1):  # nothing reads LN2 then; the final LayerNorm instead
                lm.scale_final *= 1.001
        elif corrupt == "pass_through":
            lm.scale_ln1[1] *= 1.001
        else:
            kind = "mlp_error" if has(suite, "mlp_feature", 0) else "mlp_output"
            lm.feature_group(kind, 0).activation[target.max_pos] *= 1.01  # mlp0 error (or output) at the target's position
        with pytest.raises(ExactnessError):
            attribute(lm, target, threshold=0.05, progress=False)
            pytest.fail(f"corrupting {corrupt} went unnoticed")


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
        if layer not in suite.attn_saes:  # passes through: the real attention with frozen pattern and scale
            return z
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
        if suite.clt is not None:  # every layer <= this one writes into its output, with frozen activations
            clt = suite.clt
            acts = {l: clt.encode(l, c[f"blocks.{l}.ln2.hook_normalized"]).clone() for l in range(layer + 1)}
            recon = lambda a: clt.b_dec[layer] + sum(a[l] @ clt.W_dec[l][:, layer - l] for l in range(layer + 1))
            err = c[hook.name] - recon(acts)
            if bump is not None and bump[0] == "mlp_feature" and bump[1] <= layer:
                acts[bump[1]][bump[2], bump[3]] *= factor
            if is_bumped("mlp_error", layer, bump[2] if bump else -1):
                err[bump[2]] *= factor
            return (recon(acts) + err)[None]
        if layer not in suite.transcoders:  # one frozen node per position
            frozen = c[hook.name].clone()
            if is_bumped("mlp_output", layer, bump[2] if bump else -1):
                frozen[bump[2]] *= factor
            return frozen[None]
        tc = suite.transcoders[layer]
        x = c[f"blocks.{layer}.ln2.hook_normalized"]
        acts = encode(tc, x).clone()
        W_skip = getattr(tc, "W_skip", None)
        err = c[hook.name] - decode(tc, acts) - (x @ W_skip.T if W_skip is not None else 0.0)
        skip = seen[f"blocks.{layer}.ln2.hook_normalized"] @ W_skip.T if W_skip is not None else 0.0  # live: linear
        if bump is not None and bump[0] == "mlp_feature" and bump[1] == layer:
            acts[bump[2], bump[3]] *= factor
        if is_bumped("mlp_error", layer, bump[2] if bump else -1):
            err[bump[2]] *= factor
        return (decode(tc, acts) + skip + err)[None]

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
    target = target_named(lm, suite, name)
    index = NodeIndex(lm)
    A = direct_effects(lm, index, reading_vectors(lm, [target]))[0]
    logits, seen = frozen_real_run(lm)
    base = read_real(lm, target, logits, seen)
    assert base == pytest.approx(target.clean_value(lm), rel=1e-10)
    # the largest sources of each kind, plus one source that cannot reach the target (a later position)
    cols, kinds = [], 0
    for kind in ("embed", "pos_embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error", "mlp_output"):
        sel = [c for c in range(index.n) if index.kind(c) == kind and index.stage[c] < target.stage(lm) and A[c] != 0]
        cols += sorted(sel, key=lambda c: -abs(float(A[c])))[:2]
        kinds += bool(sel)
    assert kinds >= 3 and len(cols) >= kinds + 2
    if pass_through_below(lm, target.stage(lm)):  # some sources reach the target only through pass-through attention
        assert any(int(index.pos[c]) < target.max_pos and index.kind(c) != "attn_feature" for c in cols)
    eps = 0.37
    for c in cols:
        bump = (index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c]))
        moved = read_real(lm, target, *frozen_real_run(lm, bump, 1 + eps)) - base
        assert moved == pytest.approx(eps * float(A[c]), abs=1e-9 * max(1.0, abs(base))), bump


def test_qk_pairs_move_the_score_under_intervention(lm, suite):
    """Scaling a node by (1+e) moves the score by e times its marginal, exactly, for a node on one side; for a node
    on both sides (attention passed through below carries earlier positions to both) by
    ``e (query marginal + key marginal) + e^2 pairs[i, j]``."""
    target = targets_of(lm, suite)["score"]
    index = NodeIndex(lm)
    qk = qk_decomposition(lm, index, target)
    base = target.clean_value(lm)
    where_q = {int(c): i for i, c in enumerate(qk.query_cols)}
    where_k = {int(c): j for j, c in enumerate(qk.key_cols)}
    eps, both = 0.5, 0
    for side, cols, marginal in (("query", qk.query_cols, qk.query_marginal), ("key", qk.key_cols, qk.key_marginal)):
        for j in sorted(range(len(cols)), key=lambda j: -abs(float(marginal[j])))[:3]:
            c = int(cols[j])
            bump = (index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c]))
            model_hooks = frozen_real_run_scores(lm, bump, 1 + eps)
            moved = float(model_hooks[target.head, target.query_pos, target.key_pos]) - base
            i_q, j_k = where_q.get(c), where_k.get(c)
            expect = eps * (float(qk.query_marginal[i_q]) if i_q is not None else 0.0)
            expect += eps * (float(qk.key_marginal[j_k]) if j_k is not None else 0.0)
            if i_q is not None and j_k is not None:
                expect += eps**2 * float(qk.pairs[i_q, j_k])
                both += 1
            assert moved == pytest.approx(expect, abs=1e-9), (side, bump)
    if pass_through_below(lm, target.stage(lm)):
        assert both > 0, "with attention passed through below, some nodes sit on both sides"


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
        if name not in targets_of(lm, suite):
            continue
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
    target = targets_of(lm, suite).get("mlp1") or targets_of(lm, suite)["logit_diff"]
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
        # only attention moves information across positions: an SAE's heads, or a pass-through layer between
        between = any(stage_of(s) < t < stage_of(col) and t % 2 == 1 for t in lm.linear_stages)
        if index.kind(col) == "mlp_feature" and not between:
            assert index.pos[s] == index.pos[col], "only attention moves information across positions"
        if index.kind(col) == "attn_feature":
            assert not (index.kind(s) in ("mlp_feature", "mlp_error", "mlp_output") and index.layer(s) == index.layer(col))
    # and the zeros are exact zeros in the rows of A
    reader = (active_feature(lm, "mlp_feature", 1, pos=lm.n_pos - 4) if has(suite, "mlp_feature", 1)
              else DirectionTarget("blocks.1.ln2.hook_normalized", lm.n_pos - 4,
                                   tuple(torch.randn(lm.cfg.d_model, generator=torch.Generator().manual_seed(1)).tolist())))
    row = direct_effects(lm, index, reading_vectors(lm, [reader]))[0]
    assert torch.all(row[index.pos > reader.pos] == 0)
    assert torch.all(row[index.stage >= reader.stage(lm)] == 0)
    if pass_through_below(lm, reader.stage(lm)):
        assert row[index.pos < reader.pos].abs().max() > 0, "pass-through attention carries earlier positions"
    else:
        assert torch.all(row[index.pos != reader.pos] == 0)


# ---------------------------------------------------------------------------------- 5. batch invariance
def test_rows_do_not_depend_on_batch_size_or_order(lm, suite):
    index = NodeIndex(lm)
    first = present(suite)[0]
    readers = list(targets_of(lm, suite).values())[:-2] + [active_feature(lm, *first, rank=r) for r in range(3)]
    together = direct_effects(lm, index, reading_vectors(lm, readers))
    perm = torch.randperm(len(readers), generator=torch.Generator().manual_seed(2)).tolist()
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
    readers = [active_feature(lm, kind, layer, rank=r) for kind, layer in present(suite) for r in range(2)]
    readers += [active_feature(lm, kind, layer, pos=1 + layer) for kind, layer in present(suite)]
    attn = [r for r in readers if r.kind == "attn_feature"]
    if attn:
        readers.append(FeatureTarget("attn_feature", attn[-1].layer, attn[-1].feature, attn[-1].pos, head=1))
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
    readers += [active_feature(lm, kind, layer, pos=p, rank=r) for kind, layer in present(suite)
                for p in (2, -1) for r in range(2)]
    attn = [r for r in readers if isinstance(r, FeatureTarget) and r.kind == "attn_feature"]
    if attn:
        readers.append(FeatureTarget("attn_feature", attn[-1].layer, attn[-1].feature, attn[-1].pos, head=0))
    real = reading_vectors(lm, readers, autograd=True)
    full = direct_effects(lm, index, real)
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
                assert torch.allclose(e.constant, real.constant[start : start + len(chunk)], atol=1e-12, rtol=1e-10)
    assert full[:, cols].abs().max() > 0 and full[:, dropped].abs().max() > 0
    # the stage-by-stage descent (used where attention passes through) equals the one-product path where both apply
    if not lm.linear_stages:
        e = _edge_rows_descending(lm, sources, readers, autograd=False)
        fast = edge_rows(lm, sources, readers)
        for x, y in ((e.kept, fast.kept), (e.remainder, fast.remainder), (e.constant, fast.constant)):
            assert torch.allclose(x, y, atol=1e-12, rtol=1e-10)


def test_head_parts_sum_to_the_edge_and_equal_head_restricted_readers(lm, suite):
    """Edges into attention features are split by head; where attention below passes through, the parts include
    the paths through it. Each part equals the direct effect on the head-restricted reader (autograd), and the
    parts sum to the edge."""
    names = [name for name in ("attn1",) if name in targets_of(lm, suite)]
    layers = [layer for kind, layer in present(suite) if kind == "attn_feature"]
    if not layers:
        pytest.skip("no attention SAE in this selection")
    target = targets_of(lm, suite)[names[0]] if names else active_feature(lm, "attn_feature", layers[-1])
    a = attribute(lm, target, threshold=0.0, progress=False)
    index = a.index
    readers = [target] + [index.feature_target(int(c)) for c in a.reader_cols[1:]]
    is_attn = torch.tensor([isinstance(readers[d], FeatureTarget) and readers[d].kind == "attn_feature" for d in a.edge_dst.tolist()])
    assert is_attn.any()
    parts = a.edge_heads[is_attn]
    assert not torch.isnan(parts).any() and torch.isnan(a.edge_heads[~is_attn]).all()
    assert torch.allclose(parts.sum(-1), a.edge_weight[is_attn], atol=1e-12, rtol=1e-9)
    e_attn = is_attn.nonzero()[:, 0][:40]
    for d in a.edge_dst[e_attn].unique().tolist():
        r = readers[d]
        heads = [FeatureTarget(r.kind, r.layer, r.feature, r.pos, head=h) for h in range(lm.cfg.n_heads)]
        rows = direct_effects(lm, index, reading_vectors(lm, heads, autograd=True))  # [heads, n]
        for e in e_attn[a.edge_dst[e_attn] == d].tolist():
            assert torch.allclose(a.edge_heads[e], rows[:, a.edge_src[e]], atol=1e-12, rtol=1e-9)
    if pass_through_below(lm, target.stage(lm)):
        assert (index.pos[a.edge_src[e_attn]] < torch.tensor([readers[d].pos for d in a.edge_dst[e_attn].tolist()])).any()


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


@pytest.mark.parametrize("selection", [s for s in SELECTIONS if "+" not in s])
def test_error_free_limit(selection):
    """Perfect dictionaries leave every error node at zero; the replacement score is 1 exactly where no MLP output
    is frozen (a layer without a transcoder counts as unexplained, like an error)."""
    suite = exact_suite().select(selection)
    lm = LinearisedModel(suite, suite.tokens(PROMPT))
    errors = [g for g in lm.groups if g.kind.endswith("error")]
    assert all(g.n_nodes == 0 or g.activation.max() < 1e-12 for g in errors)
    toks = suite.model.to_tokens(PROMPT)[0]
    target = (active_feature(lm, "mlp_feature", 1) if has(suite, "mlp_feature", 1)
              else LogitTarget((int(toks[3]), int(toks[5])), (1.0, -1.0), lm.n_pos - 1))
    a = attribute(lm, target, threshold=0.0, progress=False)
    assert a.max_relative_residual <= TOL
    circuit = build_circuit(lm, a, PROMPT, suite.name)
    assert all(abs(n.attribution) < 1e-12 for n in circuit.nodes() if n.kind.endswith("error"))
    replacement = graph_scores(circuit)["replacement"]
    if any(n.kind == "mlp_output" for n in circuit.nodes()):
        assert replacement < 1 - 1e-3
    else:
        assert replacement == pytest.approx(1.0, abs=1e-9)


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
        if not any(t < target.stage(lm) for t in lm.linear_stages):  # else the intervention test checks the marginals
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
    assert set(into_target) <= set(half)
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
