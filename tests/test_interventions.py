"""Interventions: the frozen mode moves every readout by its edges; the live modes equal hand-written hooks.

The references here do not reuse the code under test: edges come from ``circuits.attribution.attribute``, and
the live runs are TransformerLens hooks written out below (ReLU activations computed by hand, the clamp added
to the hook's value, patterns replaced by a clean cache).
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from circuits.attribution import attribute
from circuits.interventions import intervene, parse_node, parse_value
from circuits.linear_model import LinearisedModel
from circuits.sites import format_node_id
from circuits.targets import FeatureTarget, LogitTarget, parse_target
from saes.suite import Suite
from saes.testing import make_suite

PROMPT = "import os\nfor i in range(3):"


@pytest.fixture(scope="module")
def suite32(one_torch_thread):
    return make_suite(n_layers=2, d_sae=32, dtype=torch.float32, seed=3)


@pytest.fixture(scope="module")
def lm32(suite32):
    return LinearisedModel(suite32, suite32.tokens(PROMPT))


@pytest.fixture(scope="module")
def suite64(one_torch_thread):
    return make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=3)


@pytest.fixture(scope="module")
def lm64(suite64):
    return LinearisedModel(suite64, suite64.tokens(PROMPT))


def top_feature(lm, kind, layer, pos=-1, rank=0):
    g = lm.feature_group(kind, layer)
    pos = pos % lm.n_pos
    j = int(g.activation[pos].argsort(descending=True)[rank])
    return int(g.feature[pos, j]), float(g.activation[pos, j]), pos


def spec_of_column(index, c):
    return format_node_id(index.kind(c), index.layer(c), int(index.pos[c]), int(index.feature[c]))


# ---------------------------------------------------------------------------------------------- everything frozen
@pytest.mark.parametrize("target_name", ["mlp1", "logit_diff"])
def test_frozen_shift_moves_each_reader_by_delta_over_activation_times_edge(suite32, lm32, target_name):
    lm = lm32
    if target_name == "mlp1":
        f, _, pos = top_feature(lm, "mlp_feature", 1)
        target = FeatureTarget("mlp_feature", 1, f, pos)
    else:
        toks = suite32.model.to_tokens(PROMPT)[0]
        target = LogitTarget((int(toks[3]), int(toks[5])), (1.0, -1.0), lm.n_pos - 1)
    a = attribute(lm, target, threshold=0.0, progress=False)
    index = a.index
    readers = [target] + [index.feature_target(int(c)) for c in a.reader_cols[1:]]
    edge = {(int(s), int(d)): float(w) for s, d, w in zip(a.edge_src, a.edge_dst, a.edge_weight)}
    # the sources with the largest edges into the target, two of every kind (an MLP feature reads one position)
    sources = []
    for kind in ("embed", "pos_embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error"):
        cols = [s for (s, d) in edge if d == 0 and index.kind(s) == kind]
        sources += sorted(cols, key=lambda s: -abs(edge[s, 0]))[:2]
    assert len(sources) >= 8
    delta = 3.0
    nodes = readers[1:9]
    checked = 0
    for s in sources:
        res = intervene(suite32, PROMPT, {spec_of_column(index, s): f"+{delta}"}, freeze="all", target=target,
                        nodes=nodes, lm=lm)
        a_s = float(index.activation[s])
        for r, out in enumerate([res.target, *res.nodes]):
            expect = delta / a_s * edge.get((s, r), 0.0)
            assert out.change == pytest.approx(expect, abs=1e-4 * max(1.0, abs(out.clean))), (spec_of_column(index, s), out.spec)
            checked += expect != 0
    assert checked >= len(sources), "most readers should have an edge from some source"


def test_frozen_values_add_up_and_a_zeroed_source_removes_its_edge(suite32, lm32):
    lm = lm32
    f, _, pos = top_feature(lm, "mlp_feature", 1)
    target = FeatureTarget("mlp_feature", 1, f, pos)
    a = attribute(lm, target, threshold=0.0, progress=False)
    index = a.index
    into_target = {int(s): float(w) for s, d, w in zip(a.edge_src, a.edge_dst, a.edge_weight) if int(d) == 0}
    feats = sorted((s for s in into_target if index.kind(s).endswith("feature")), key=lambda s: -abs(into_target[s]))[:3]
    specs = [spec_of_column(index, s) for s in feats]
    values = ["*0", "*2.5", 1.75]
    res = intervene(suite32, PROMPT, dict(zip(specs, values)), freeze="all", target=target, lm=lm)
    a_s = [float(index.activation[s]) for s in feats]
    expect = -into_target[feats[0]] + 1.5 * into_target[feats[1]] + (1.75 - a_s[2]) / a_s[2] * into_target[feats[2]]
    assert res.target.change == pytest.approx(expect, abs=1e-4 * max(1.0, abs(res.target.clean)))
    assert [i.new for i in res.interventions] == pytest.approx([0.0, 2.5 * a_s[1], 1.75], rel=1e-6)
    # a node set in the frozen model reports the value it is held at
    res = intervene(suite32, PROMPT, {specs[0]: "*2"}, freeze="all", target=target, nodes=[specs[0]], lm=lm)
    assert res.nodes[0].activation_intervened == pytest.approx(2 * a_s[0], rel=1e-6)
    # a source after the target's position cannot move it
    later = [c for c in range(index.n) if int(index.pos[c]) > 2 and index.kind(c) == "mlp_feature"]
    early_target = FeatureTarget("mlp_feature", 1, *top_feature(lm, "mlp_feature", 1, pos=2)[::2])
    res = intervene(suite32, PROMPT, {spec_of_column(index, later[0]): "*5"}, freeze="all", target=early_target, lm=lm)
    assert res.target.change == 0.0


# ---------------------------------------------------------------------------------------------- live modes
def relu_act(sae, x, feature):
    return torch.relu(x @ sae.W_enc[:, feature] + sae.b_enc[feature])


def hand_clamp(suite, tokens, kind, layer, pos, feature, value, freeze_patterns=False, every_new_from=None):
    """The real model with one feature clamped by hand: its decoder row times (value - live activation) is added
    to the dictionary's output hook; with ``every_new_from``, also at every position from there on. Returns the
    logits and the hook values (before the clamp) of every hook_z and ln2.hook_normalized."""
    model = suite.model
    seen = {}
    clean_patterns = {}
    if freeze_patterns:
        _, cache = model.run_with_cache(tokens[:, : every_new_from or tokens.shape[1]])
        clean_patterns = {l: cache[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layers)}
    positions = [pos] + (list(range(every_new_from, tokens.shape[1])) if every_new_from else [])

    def grab(x, hook):
        seen[hook.name] = x[0].clone()

    def at_z(z, hook):
        if kind != "attn_feature" or hook.layer() != layer:
            return z
        sae = suite.attn_saes[layer]
        z = z.clone()
        for p in positions:
            flat = z[0, p].reshape(-1)
            flat = flat + (value - relu_act(sae, flat, feature)) * sae.W_dec[feature]
            z[0, p] = flat.reshape(z.shape[2:])
        return z

    def at_mlp(out, hook):
        if kind != "mlp_feature" or hook.layer() != layer:
            return out
        tc = suite.transcoders[layer]
        x = seen[f"blocks.{layer}.ln2.hook_normalized"]
        out = out.clone()
        for p in positions:
            out[0, p] += (value - relu_act(tc, x[p], feature)) * tc.W_dec[feature]
        return out

    def pattern(p, hook):
        p = p.clone()
        n = clean_patterns[hook.layer()].shape[-1]
        p[:, :, :n, :n] = clean_patterns[hook.layer()]
        return p

    hooks = []
    for l in range(model.cfg.n_layers):
        hooks += [(f"blocks.{l}.attn.hook_z", grab), (f"blocks.{l}.attn.hook_z", at_z),
                  (f"blocks.{l}.ln2.hook_normalized", grab), (f"blocks.{l}.hook_mlp_out", at_mlp)]
        if freeze_patterns:
            hooks.append((f"blocks.{l}.attn.hook_pattern", pattern))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)[0]
    return logits, seen


@pytest.mark.parametrize("freeze", ["none", "attention"])
@pytest.mark.parametrize("kind,layer,value", [("mlp_feature", 0, 0.0), ("attn_feature", 0, "*3"), ("attn_feature", 1, -0.5)])
def test_live_modes_equal_a_hand_written_hook(suite64, lm64, freeze, kind, layer, value):
    lm, suite = lm64, suite64
    f, a, pos = top_feature(lm, kind, layer, pos=4)
    spec = f"{'attn' if kind == 'attn_feature' else 'mlp'}{layer}:{f}@{pos}"
    new = parse_value(value).resolve(a)
    readers = [f"mlp1:{top_feature(lm, 'mlp_feature', 1, pos=p)[0]}@{p}" for p in (pos, -1)]
    readers += [f"attn1:{top_feature(lm, 'attn_feature', 1)[0]}@-1"]
    res = intervene(suite, PROMPT, {spec: value}, freeze=freeze, target=readers[0], nodes=readers[1:], top_k=5, lm=lm)
    logits, seen = hand_clamp(suite, lm.tokens, kind, layer, pos, f, new, freeze_patterns=freeze == "attention")
    for out in (res.target, *res.nodes):
        t = parse_target(out.spec, suite, lm.n_pos)
        sae = lm.dictionary(t.kind, t.layer)
        hook = f"blocks.{t.layer}.attn.hook_z" if t.kind == "attn_feature" else f"blocks.{t.layer}.ln2.hook_normalized"
        x = seen[hook][t.pos].reshape(-1)
        assert out.intervened == pytest.approx(float(x @ sae.W_enc[:, t.feature] + sae.b_enc[t.feature]), abs=1e-9)
        assert out.activation_intervened == pytest.approx(float(relu_act(sae, x, t.feature)), abs=1e-9)
    assert res.interventions[0].new == pytest.approx(new, abs=1e-12)
    top = logits[-1].topk(5)
    assert [t.token_id for t in res.top_logits_intervened] == top.indices.tolist()
    assert [t.logit for t in res.top_logits_intervened] == pytest.approx(top.values.tolist(), abs=1e-9)
    assert max(abs(o.change) for o in (res.target, *res.nodes)) > 1e-3, "the clamp should move something"


def test_live_error_and_embedding_scales_equal_a_hand_written_hook(suite64, lm64):
    """``mlp0.error@P=*F`` scales the transcoder's error vector of that run; ``embed@P=*F`` the token embedding."""
    lm, suite, model = lm64, suite64, suite64.model
    tc = suite.transcoders[0]
    target = f"mlp1:{top_feature(lm, 'mlp_feature', 1)[0]}@-1"
    t = parse_target(target, suite, lm.n_pos)
    p = lm.n_pos - 1
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x[0].clone()

    def scale_error(out, hook):
        x = seen["blocks.0.ln2.hook_normalized"]
        recon = torch.relu(x @ tc.W_enc + tc.b_enc) @ tc.W_dec + tc.b_dec
        out = out.clone()
        out[0, p] += (2.5 - 1) * (out[0, p] - recon[p])
        return out

    def scale_embed(x, hook):
        x = x.clone()
        x[0, 2] *= 0.5
        return x

    for spec, hooks in ((f"mlp0.error@{p}", [("blocks.0.hook_mlp_out", scale_error)]),
                        ("embed@2", [("hook_embed", scale_embed)])):
        factor = 2.5 if "error" in spec else 0.5
        res = intervene(suite, PROMPT, {spec: f"*{factor}"}, freeze="none", target=target, lm=lm)
        seen.clear()
        hooks = [("blocks.0.ln2.hook_normalized", grab), ("blocks.1.ln2.hook_normalized", grab)] + hooks
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(lm.tokens)
        x = seen["blocks.1.ln2.hook_normalized"][t.pos]
        sae = suite.transcoders[1]
        assert res.target.intervened == pytest.approx(float(x @ sae.W_enc[:, t.feature] + sae.b_enc[t.feature]), abs=1e-9)
        assert abs(res.target.change) > 1e-6, spec


def test_freeze_attention_differs_from_none_and_a_no_op_changes_nothing(suite64, lm64):
    f, a, pos = top_feature(lm64, "attn_feature", 0, pos=3)
    spec = f"attn0:{f}@{pos}"
    target = f"attn1:{top_feature(lm64, 'attn_feature', 1)[0]}@-1"
    frozen = intervene(suite64, PROMPT, {spec: "*4"}, freeze="attention", target=target, lm=lm64)
    live = intervene(suite64, PROMPT, {spec: "*4"}, freeze="none", target=target, lm=lm64)
    assert abs(frozen.target.intervened - live.target.intervened) > 1e-6, "layer 1's patterns read layer 0's write"
    for freeze in ("all", "attention", "none"):
        same = intervene(suite64, PROMPT, {spec: "*1"}, freeze=freeze, target=target, lm=lm64)
        assert same.target.intervened == pytest.approx(same.target.clean, abs=1e-9)


def test_generation_holds_the_clamp_at_every_new_position(suite64, lm64):
    lm, suite, n = lm64, suite64, 4
    f, a, pos = top_feature(lm, "mlp_feature", 0, pos=-1)
    for freeze in ("none", "attention"):
        res = intervene(suite, PROMPT, {f"mlp0:{f}@{pos}": 40.0}, freeze=freeze, generate=n, lm=lm)
        tokens = lm.tokens
        for _ in range(n):
            logits, _ = hand_clamp(suite, tokens, "mlp_feature", 0, pos, f, 40.0, freeze_patterns=freeze == "attention",
                                   every_new_from=lm.n_pos if tokens.shape[1] > lm.n_pos else None)
            tokens = torch.cat([tokens, logits[-1].argmax().view(1, 1)], 1)
        assert list(res.generation.intervened_ids) == tokens[0, lm.n_pos:].tolist()
        plain = lm.tokens
        for _ in range(n):
            with torch.no_grad():
                plain = torch.cat([plain, suite.model(plain)[0, -1].argmax().view(1, 1)], 1)
        assert list(res.generation.clean_ids) == plain[0, lm.n_pos:].tolist()
    assert res.generation.intervened_ids != res.generation.clean_ids, "a large clamp should change what is written"


# ---------------------------------------------------------------------------------------------- bad specifications
@pytest.mark.parametrize("interventions,freeze,message", [
    ({"mlp7:1@2": 0}, "all", "layer 7 does not exist"),
    ({"resid3:1@2": 0}, "all", "cannot parse node 'resid3:1@2'"),
    ({"mlp1:5": 0}, "all", "add @P"),
    ({"mlp1:999@2": 0}, "all", "feature 999 is out of range for mlp1, which has 32 features: use 0..31"),
    ({"mlp1:3@40": 0}, "all", "position 40 is out of range"),
    ({"mlp1.error@-40": 0}, "none", "position -40 is out of range"),
    ({"mlp0:1@2": "abc"}, "all", "is not numeric"),
    ({"mlp0:1@2": "*x"}, "all", "is not numeric"),
    ({"mlp0:1@2": None}, "all", "is not a number"),
    ({"mlp0:1@2": True}, "all", "is not a number"),
    ({"mlp0:1@2": "nan"}, "all", "is not numeric"),
    ({"mlp0:1@2": float("inf")}, "all", "is not finite"),
    ({"embed@2": -1.0}, "all", "use *-1 to flip"),
    ({}, "all", "no intervention was given"),
], ids=lambda v: str(v)[:30])
def test_bad_specifications_are_refused(suite32, lm32, interventions, freeze, message):
    with pytest.raises(ValueError, match=None) as e:
        intervene(suite32, PROMPT, interventions, freeze=freeze, lm=lm32)
    assert message in str(e.value)


def test_inactive_features_and_bad_options_are_refused(suite32, lm32):
    lm = lm32
    g = lm.feature_group("mlp_feature", 0)
    inactive = next(f for f in range(32) if not (g.feature[2][g.mask[2]] == f).any())
    spec = f"mlp0:{inactive}@2"
    with pytest.raises(ValueError, match=f"{spec} is not active in the clean pass.*no node of the linearised model"):
        intervene(suite32, PROMPT, {spec: 1.0}, freeze="all", lm=lm)
    with pytest.raises(ValueError, match=r"\*2 changes nothing; give an absolute value"):
        intervene(suite32, PROMPT, {spec: "*2"}, freeze="none", lm=lm)
    switched = intervene(suite32, PROMPT, {spec: 1.0}, freeze="none", nodes=[spec], lm=lm)  # switching a feature on
    assert switched.nodes[0].activation_clean == 0 and switched.nodes[0].activation_intervened == pytest.approx(1.0)
    f, _, pos = top_feature(lm, "mlp_feature", 0, pos=2)
    ok = {f"mlp0:{f}@{pos}": 0}
    for kwargs, message in [(dict(freeze="some"), "freeze must be one of all, attention, none"),
                            (dict(generate=3), "generate needs freeze='attention' or 'none'"),
                            (dict(freeze="none", generate=10_000), "exceeds the context"),
                            (dict(top_k=0), "top_k must be an integer"),
                            (dict(target="mlp1:99"), "feature 99 is out of range"),
                            (dict(nodes=["attn1:3@99"]), "position 99 is out of range")]:
        with pytest.raises(ValueError) as e:
            intervene(suite32, PROMPT, ok, lm=lm, **kwargs)
        assert message in str(e.value), kwargs
    with pytest.raises(ValueError, match="is set twice"):
        intervene(suite32, PROMPT, {f"mlp0:{f}@{pos}": 0, f"mlp0:{f}@{pos - lm.n_pos}": 1}, lm=lm)


def test_missing_dictionary_and_node_objects(suite32, lm32):
    partial = Suite(suite32.name, suite32.model, {0: suite32.attn_saes[0]}, {0: suite32.transcoders[0]})
    with pytest.raises(ValueError, match="the suite has no mlp dictionary at layer 1; it has attn0, mlp0"):
        parse_node("mlp1:3@2", partial, 10)
    with pytest.raises(ValueError, match="the suite has no attn dictionary at layer 1"):
        parse_node("attn1.error@2", partial, 10)

    class Node:
        id = "attn0.error@-1"

    assert parse_node(Node(), suite32, 10).id == "attn0.error@9"
    assert parse_node({"id": "embed@3", "kind": "embed"}, suite32, 10).id == "embed@3"
    # a graph's node dicts are not hashable: (node, value) pairs serve, and give what the id gives
    f, _, pos = top_feature(lm32, "mlp_feature", 0, pos=2)
    by_pairs = intervene(suite32, PROMPT, [({"id": f"mlp0:{f}@{pos}"}, "*0"), (Node(), "*2")], lm=lm32)
    by_ids = intervene(suite32, PROMPT, {f"mlp0:{f}@{pos}": "*0", "attn0.error@-1": "*2"}, lm=lm32)
    assert by_pairs.target == by_ids.target and by_pairs.interventions == by_ids.interventions
    with pytest.raises(ValueError, match="or be \\(node, value\\) pairs"):
        intervene(suite32, PROMPT, ["mlp0:1@2"], lm=lm32)
    assert parse_value("+-0.5").op == "add" and parse_value("+-0.5").resolve(2.0) == 1.5
    assert parse_value("-0.5").op == "set" and parse_value("*0").resolve(3.0) == 0.0


# ---------------------------------------------------------------------------------------------- the command
def test_cli_writes_the_intervention_and_refuses_bad_input(tmp_path, suite32, lm32, capsys):
    from scripts.cli import main
    from test_circuits_graph import save_suite

    save_suite(suite32, tmp_path / "suite")
    f, a, pos = top_feature(lm32, "mlp_feature", 0, pos=-1)
    node = f"mlp1:{top_feature(lm32, 'mlp_feature', 1)[0]}@-1"
    base = ["intervene", "--model", "mini", "--suite-dir", str(tmp_path / "suite"), "--device", "cpu", "--prompt", PROMPT]
    out = tmp_path / "out"
    assert main(base + ["--set", f"mlp0:{f}@{pos}=*0", "--node", node, "--freeze", "none", "--generate", "2",
                        "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target" in text and "top logits" in text and "greedy 2 tokens" in text
    d = json.loads((out / "intervention.json").read_text())
    direct = intervene(suite32, PROMPT, {f"mlp0:{f}@{pos}": "*0"}, freeze="none", nodes=[node], generate=2)
    assert d["target"]["spec"] == direct.target.spec
    assert d["target"]["clean"] == pytest.approx(direct.target.clean, abs=1e-6)
    assert d["target"]["intervened"] == pytest.approx(direct.target.intervened, abs=1e-6)
    assert d["nodes"][node.replace("@-1", f"@{lm32.n_pos - 1}")]["intervened"] == pytest.approx(direct.nodes[0].intervened, abs=1e-6)
    assert len(d["top_logits"]["clean"]) == len(d["top_logits"]["intervened"]) == 10
    assert d["generation"]["intervened_ids"] == list(direct.generation.intervened_ids)
    assert [p.name for p in out.iterdir()] == ["intervention.json"]

    afile = tmp_path / "a_file"
    afile.write_text("x")
    bad = [(["--set", f"mlp0:{f}@{pos}"], "write it as NODE=VALUE"),
           (["--set", f"mlp0:{f}@{pos}=big"], "is not numeric"),
           (["--set", "mlp0:99@1=0"], "feature 99 is out of range"),
           (["--set", "mlp0.err@1=0"], "cannot parse node 'mlp0.err@1'"),
           (["--set", f"mlp0:{f}@77=0"], "position 77 is out of range"),
           (["--set", f"mlp0:{f}@{pos}=0", "--freeze", "all", "--generate", "3"], "generate needs freeze"),
           (["--set", f"mlp0:{f}@{pos}=0", "--out", str(afile / "sub")], "is a file, not a folder")]
    for extra, message in bad:
        dest = tmp_path / "refused"
        rc = main(base + extra + ([] if "--out" in extra else ["--out", str(dest)]))
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not dest.exists()


# ---------------------------------------------------------------------------------------------- the mini suite
@pytest.mark.slow
def test_mini_strongest_edge_by_intervention():
    """On the embedded suite (float32): switching off the source of the target's strongest edge, everything else
    frozen, removes exactly that edge; in the real model the target moves too."""
    from circuits.trace import trace
    from saes.suite import MINI_DIR, load_suite

    if not (MINI_DIR / "cfg.json").is_file():
        pytest.skip("the mini suite is not built (saes/mini/cfg.json)")
    suite = load_suite("mini")
    prompt = "import os\nimport sys\n\ndef main(args):\n"
    t = trace(suite, prompt, threshold=0.01, faithfulness=False, progress=False)
    into = [e for e in t.circuit.edges() if e.target == "target" and ":" in e.source]
    strongest = max(into, key=lambda e: abs(e.weight))
    res = intervene(suite, prompt, {strongest.source: "*0"}, freeze="all", lm=t.model)
    assert res.target.spec == t.circuit.target
    assert res.target.change == pytest.approx(-strongest.weight, abs=1e-4 * max(1.0, abs(res.target.clean)))
    live = intervene(suite, prompt, {strongest.source: "*0"}, freeze="none", lm=t.model)
    assert live.target.clean == pytest.approx(res.target.clean, abs=1e-5) and live.target.change != 0


# ---------------------------------------------------------------------------------------------- partial, skip, CLT suites
PARTIAL = ["mlp", "attn,mlp1", "mlp+skip", "mlp+clt", "attn1+clt"]


@pytest.fixture(scope="module", params=PARTIAL)
def partial(request, one_torch_thread):
    """(suite, lm) of a float64 tiny suite: transcoders only (every attention layer passes through), no transcoder
    at layer 0 (its MLP output a node), a skip transcoder at every layer, a cross-layer transcoder."""
    from test_circuits_identities import with_clt, with_skip

    spec, _, extra = request.param.partition("+")
    full = make_suite(n_layers=2, d_sae=32, dtype=torch.float64, seed=3)
    suite = full.select(spec)
    suite = with_skip(suite) if extra == "skip" else with_clt(suite) if extra == "clt" else suite
    return suite, LinearisedModel(suite, suite.tokens(PROMPT))


node_id = spec_of_column


def test_frozen_identity_on_partial_skip_and_clt_suites(partial):
    """delta / activation x edge, for sources of every kind the suite has (``mlp_output`` nodes included) and every
    reader: edges through pass-through attention, skip paths and a CLT's later writes are what the frozen run sees."""
    suite, lm = partial
    toks = suite.model.to_tokens(PROMPT)[0]
    target = LogitTarget((int(toks[3]), int(toks[5])), (1.0, -1.0), lm.n_pos - 1)
    a = attribute(lm, target, threshold=0.0, progress=False)
    index = a.index
    readers = [index.feature_target(int(c)) for c in a.reader_cols[1:]]
    edge = {(int(s), int(d)): float(w) for s, d, w in zip(a.edge_src, a.edge_dst, a.edge_weight)}
    kinds = sorted({index.kind(s) for s, _ in edge})
    sources = []
    for kind in kinds:
        cols = sorted({s for s, _ in edge if index.kind(s) == kind}, key=lambda s: -abs(edge.get((s, 0), 0.0)))
        sources += cols[:2]
    if suite.clt is None and len(suite.transcoders) < suite.n_layers:
        assert "mlp_output" in kinds
    nodes = readers[:8]
    assert nodes, "the graph should have feature readers"
    for s in sources:
        res = intervene(suite, PROMPT, {node_id(index, s): "*1.5"}, freeze="all", target=target, nodes=nodes, lm=lm)
        for r, out in enumerate([res.target, *res.nodes]):
            expect = 0.5 * edge.get((s, r), 0.0)
            assert out.change == pytest.approx(expect, abs=1e-9 * max(1.0, abs(out.clean))), (node_id(index, s), out.spec)
    moved = [edge[s, 0] for s in sources if (s, 0) in edge]
    assert len(moved) >= len(kinds) and any(abs(w) > 1e-6 for w in moved)


def hand_live(suite, tokens, feature=None, output=None):
    """The real model with, by hand, one feature clamped (``(layer, pos, f, value)`` at an MLP layer: the change of
    its activation times each of its decoder rows added to the MLP outputs it writes, a CLT's every later one) or
    one MLP output scaled (``(layer, pos, factor)``). Returns every ln2.hook_normalized seen."""
    model, seen = suite.model, {}

    def grab(x, hook):
        seen[hook.name] = x[0].clone()

    def at_mlp(out, hook):
        T = hook.layer()
        out = out.clone()
        if feature is not None:
            L, p, f, value = feature
            if suite.clt is not None and T >= L:
                x = seen[f"blocks.{L}.ln2.hook_normalized"][p]
                act = torch.relu(x @ suite.clt.W_enc[L][:, f] + suite.clt.b_enc[L][f])
                out[0, p] += (value - act) * suite.clt.W_dec[L][f, T - L]
            elif suite.clt is None and T == L:
                tc = suite.transcoders[L]
                act = torch.relu(seen[f"blocks.{L}.ln2.hook_normalized"][p] @ tc.W_enc[:, f] + tc.b_enc[f])
                out[0, p] += (value - act) * tc.W_dec[f]  # the skip path is in ``out``: it stays live
        if output is not None and output[0] == T:
            out[0, output[1]] *= output[2]
        return out

    hooks = []
    for l in range(model.cfg.n_layers):
        hooks += [(f"blocks.{l}.ln2.hook_normalized", grab), (f"blocks.{l}.hook_mlp_out", at_mlp)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    return seen


def test_live_runs_on_partial_skip_and_clt_suites_equal_a_hand_written_hook(partial):
    suite, lm = partial
    pos = 4
    reader_layer = 1
    if suite.clt is None and reader_layer not in suite.transcoders:
        pytest.skip("this suite has no transcoder or CLT at layer 1, so there is no layer-1 feature to read")
    f1 = int(lm.feature_group("mlp_feature", 1).feature[-1, 0])
    reader = f"mlp1:{f1}@-1"
    if suite.clt is not None or 0 in suite.transcoders:
        g = lm.feature_group("mlp_feature", 0)
        f = int(g.feature[pos, int(g.activation[pos].argmax())])
        a0 = float(g.activation[pos].max())
        spec, kwargs = f"mlp0:{f}@{pos}", dict(feature=(0, pos, f, 3 * a0))
    else:
        spec, kwargs = f"mlp0.out@{pos}", dict(output=(0, pos, 3.0))
    res = intervene(suite, PROMPT, {spec: "*3"}, freeze="none", target=reader, lm=lm)
    seen = hand_live(suite, lm.tokens, **kwargs)
    x = seen["blocks.1.ln2.hook_normalized"][lm.n_pos - 1]
    enc = lm.dictionary("mlp_feature", 1)
    assert res.target.intervened == pytest.approx(float(x @ enc.W_enc[:, f1] + enc.b_enc[f1]), abs=1e-9)
    assert abs(res.target.change) > 1e-6
    # nothing set: the spliced run is the model itself
    same = intervene(suite, PROMPT, {spec: "*1"}, freeze="none", target=reader, lm=lm)
    assert same.target.change == pytest.approx(0.0, abs=1e-12)


def test_mlp_output_nodes_and_clt_errors_parse_against_the_suite(partial):
    suite, lm = partial
    if suite.clt is None and 0 not in suite.transcoders:
        assert parse_node("mlp0.out@-1", suite, lm.n_pos).id == f"mlp0.out@{lm.n_pos - 1}"
        with pytest.raises(ValueError, match="its MLP output is the node mlp0.out@2"):
            parse_node("mlp0:1@2", suite, lm.n_pos)
    else:
        with pytest.raises(ValueError, match="layer 0 has a transcoder, so its MLP output is no node"):
            parse_node("mlp0.out@2", suite, lm.n_pos)
        assert parse_node("mlp0.error@2", suite, lm.n_pos).kind == "mlp_error"
    with pytest.raises(ValueError, match="only an MLP output is a node"):
        parse_node("attn0.out@2", suite, lm.n_pos)


def test_live_clt_error_scale_equals_a_hand_written_hook(partial):
    suite, lm = partial
    if suite.clt is None:
        pytest.skip("this suite has no cross-layer transcoder, whose error this test scales")
    clt, model, p = suite.clt, suite.model, lm.n_pos - 1
    res = intervene(suite, PROMPT, {f"mlp0.error@{p - 2}": "*2.5"}, freeze="none", target=LogitTarget((3,), (1.0,), p),
                    lm=lm)
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x[0].clone()

    def scale_error(out, hook):
        recon = clt.b_dec[0] + torch.relu(seen["blocks.0.ln2.hook_normalized"] @ clt.W_enc[0] + clt.b_enc[0]) @ clt.W_dec[0][:, 0]
        out = out.clone()
        out[0, p - 2] += 1.5 * (out[0, p - 2] - recon[p - 2])
        return out

    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.ln2.hook_normalized", grab), ("blocks.0.hook_mlp_out", scale_error)]):
        logits = model(lm.tokens)[0]
    assert res.target.intervened == pytest.approx(float(logits[p, 3]), abs=1e-9)
    assert abs(res.target.change) > 1e-6
