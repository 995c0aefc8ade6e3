"""Agreement, edge for edge, with circuit-tracer 0.5's ``attribute()`` on the mini model with its transcoders only.

The comparison runs on mini's own transcoders, on copies of them given a random skip connection (``W_skip``,
a linear path that both sides carry back through, not part of the error) and on a random ReLU cross-layer
transcoder in their place (a feature writes into its layer and every later one). Both implementations build
the same local replacement model (attention patterns and LayerNorm scales frozen,
MLPs replaced by transcoders plus error terms) and compute direct effects in it: circuit-tracer by injecting
encoder or logit vectors as gradients in the real model and backpropagating through frozen attention; this
project by carrying reading vectors back through pass-through attention in closed form
(``LinearisedModel.descend``). The in-edges of the target and of every transcoder feature must agree to
1e-4 relative (to the largest edge of the row), for sources of every kind: transcoder features, errors and
token embeddings.

## How circuit-tracer's conventions map onto ours

- **Weights, processed or not.** circuit-tracer loads Hugging Face models unprocessed (``fold_ln=False``,
  ``center_writing_weights=False``, ``center_unembed=False``); this project processes them as GPT-2's
  ``from_pretrained`` does. Here both sides run the *same* processed mini weights: circuit-tracer's
  ``TransformerLensReplacementModel`` is built from mini's config and loads mini's ``state_dict``. The choice
  does not change edges: transcoders read ``ln2.hook_normalized`` (before the LayerNorm weight, so the same in
  both forms), folding moves the LayerNorm weight and bias into the next matrices, and a mean added to a
  residual write is removed by the next LayerNorm's centring, which every reading vector contains.
- **Activations.** mini's layer-0 transcoder is JumpReLU with thresholds > 0, where circuit-tracer's
  ``JumpReLU`` (``x * (x > threshold)``) equals sae-lens's (``relu(x) * (x > threshold)``). Its other
  transcoders are TopK, where sae-lens applies a ReLU after the top k and circuit-tracer's ``TopK`` does not;
  the circuit-tracer side is given ``Sequential(TopK(k), ReLU())``, circuit-tracer's own TopK followed by a
  ReLU, so both keep the same features (``circuits.circuit_tracer_compat`` builds that side; the test checks
  that the active features and their activations agree).
- **BOS position zeroed.** circuit-tracer sets every feature activation and error vector at position 0 to zero:
  they are not nodes and their effects are attributed to nothing. This project keeps them as nodes. So edges
  from position-0 features and errors are in our graph only, and position-0 features have no row in
  circuit-tracer's; the comparison leaves both out (and checks that they exist on our side). The BOS *token
  embedding* is a node on both sides and is compared.
- **Position embeddings folded into a constant.** circuit-tracer has no position-embedding nodes: ``W_pos``
  reaches the targets but is attributed to nothing (neither are the biases). Here each position embedding is a
  node (``pos_embed@p``), and the biases are each reader's constant. Edges from ``pos_embed`` nodes have no
  counterpart and are left out; our certificate (edges + constant = value) holds with them in.
- **Demeaned logits.** circuit-tracer's logit target reads ``W_U[:, t] - mean_v W_U[:, v]`` (the logit minus the
  mean logit). mini's unembedding is centred (``center_unembed``), so that vector is ``W_U[:, t]`` to rounding
  (the test checks it) and our ``LogitTarget`` of token t has the same reading vector. For an uncentred
  unembedding the counterpart is ``DirectionTarget("ln_final.hook_normalized", pos, W_U[:, t] - W_U.mean(1))``.
- **Node order.** circuit-tracer's adjacency is ``[target, source]`` over the active features ordered by
  (layer, position, feature), then the error nodes (layer-major, one per layer and position), the token
  embeddings (one per position) and the logits; ours is a list of (source, reader, weight) edges over node ids
  (``mlp1:613@5``, ``mlp1.error@5``, ``embed@5``). The test maps one onto the other by (layer, position, feature).
"""

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from circuits.attribution import attribute
from circuits.circuit_tracer_compat import circuit_tracer_replacement_model
from circuits.linear_model import LinearisedModel
from circuits.targets import LogitTarget
from saes.suite import MINI_DIR

pytest.importorskip("circuit_tracer")
pytestmark = pytest.mark.skipif(not (MINI_DIR / "cfg.json").is_file(), reason="the mini suite is not built")

PROMPT = "import os\nimport sys\n"
REL = 1e-4


def mini_with(kind: str):
    """mini with its transcoders (``plt``); with copies of them given a random ``W_skip`` (``skip``); or with a
    random ReLU cross-layer transcoder in their place (``clt``). Attention passes through in all three."""
    import copy

    from saes.clt import CLTConfig, CrossLayerTranscoder
    from saes.suite import Suite, load_suite

    suite = load_suite("mini", dictionaries="mlp")
    for p in suite.model.parameters():
        p.requires_grad_(False)
    if kind == "plt":
        return suite
    gen = torch.Generator().manual_seed(0)
    d = suite.model.cfg.d_model
    if kind == "skip":
        transcoders = {}
        for layer, tc in suite.transcoders.items():
            tc = copy.deepcopy(tc)
            tc.W_skip = torch.nn.Parameter(0.1 * torch.randn(d, d, generator=gen) / d**0.5, requires_grad=False)
            transcoders[layer] = tc
        return Suite(suite.name, suite.model, {}, transcoders, suite.info)
    cfg = suite.model.cfg
    clt = CrossLayerTranscoder(CLTConfig(n_layers=cfg.n_layers, d_model=d, d_sae=96))
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / d**0.5)
        clt.b_enc.sub_(1.0)  # a sparse code: a few features per position
    for p in clt.parameters():
        p.requires_grad_(False)
    return Suite(suite.name, suite.model, {}, {}, suite.info, clt=clt)


@pytest.fixture(scope="module", params=["plt", "skip", "clt"])
def both(request, one_torch_thread):
    from circuit_tracer.attribution.attribute import attribute as ct_attribute

    suite = mini_with(request.param)
    tokens = suite.tokens(PROMPT)
    replacement = circuit_tracer_replacement_model(suite)
    token = int(tokens[0, -1])  # the last token's logit at the last position (any token would do)
    graph = ct_attribute(tokens[0], replacement, attribution_targets=torch.tensor([token]), max_feature_nodes=None,
                         batch_size=256)
    lm = LinearisedModel(suite, tokens)
    ours = attribute(lm, LogitTarget((token,), (1.0,), lm.n_pos - 1), threshold=0.0, progress=False)
    yield suite, lm, ours, graph
    replacement.reset_hooks(including_permanent=True)
    del replacement
    gc.collect()


def test_the_demeaned_logit_is_our_logit(both):
    suite, lm, ours, graph = both
    W_U = suite.model.W_U
    assert float(W_U.mean(1).norm()) <= 1e-6 * float(W_U[:, graph.logit_targets[0].vocab_idx].norm())


def test_same_active_features_after_position_zero(both):
    """The same nodes on both sides after position 0 (for mini's TopK transcoders, circuit-tracer's TopK followed by
    a ReLU), with the same activations."""
    suite, lm, ours, graph = both
    index = ours.index
    is_feat = torch.tensor([index.kind(c) == "mlp_feature" for c in range(index.n)])
    mine = {(index.layer(c), int(index.pos[c]), int(index.feature[c])) for c in is_feat.nonzero()[:, 0].tolist()}
    theirs = {tuple(x) for x in graph.active_features.tolist()}
    assert theirs == {f for f in mine if f[1] > 0}
    assert any(f[1] == 0 for f in mine), "position 0 has features here (circuit-tracer zeroes them)"
    acts = {tuple(x): float(v) for x, v in zip(graph.active_features.tolist(), graph.activation_values.tolist())}
    for c in is_feat.nonzero()[:, 0].tolist():
        key = (index.layer(c), int(index.pos[c]), int(index.feature[c]))
        if key in acts:
            assert float(index.activation[c]) == pytest.approx(acts[key], rel=1e-5, abs=1e-6)


def test_in_edges_agree_with_circuit_tracer(both):
    suite, lm, ours, graph = both
    index, n_pos, n_layers = ours.index, lm.n_pos, lm.n_layers
    feats = graph.active_features.tolist()
    n_feat = len(feats)
    feature_col = {tuple(f): i for i, f in enumerate(feats)}

    def ct_column(c: int) -> int | None:
        """circuit-tracer's adjacency column of our node column c, or None where it has no such node."""
        kind, layer, pos = index.kind(c), index.layer(c), int(index.pos[c])
        if kind == "mlp_feature":
            return feature_col.get((layer, pos, int(index.feature[c])))
        if kind == "mlp_error":
            return n_feat + layer * n_pos + pos if pos > 0 else None
        if kind == "embed":
            return n_feat + n_layers * n_pos + pos
        return None  # pos_embed: no node there

    col_map = torch.tensor([-1 if (j := ct_column(c)) is None else j for c in range(index.n)])
    A = graph.adjacency_matrix.to(torch.float64)
    readers = [("target", A.shape[0] - 1)]
    for r, c in enumerate(ours.reader_cols.tolist()[1:], start=1):
        key = (index.layer(c), int(index.pos[c]), int(index.feature[c]))
        readers.append((r, feature_col[key]) if key in feature_col else (r, None))
    assert sum(row is None for _, row in readers) > 0, "position-0 features read here but are zeroed there"
    compared_kinds: dict[str, int] = {}
    left_out = 0
    n_rows = 0
    worst_rel: list[float] = []
    for r, ct_row in readers:
        if ct_row is None:
            continue
        r_idx = 0 if r == "target" else r
        sel = ours.edge_dst == r_idx
        src, w = ours.edge_src[sel], ours.edge_weight[sel].to(torch.float64)
        mapped = col_map[src]
        mine = torch.zeros(A.shape[1], dtype=torch.float64)
        mine[mapped[mapped >= 0]] = w[mapped >= 0]
        left_out += int((mapped < 0).sum())
        theirs = A[ct_row]
        scale = float(theirs.abs().max())
        assert scale > 0
        diff = (mine - theirs).abs()
        worst = int(diff.argmax())
        worst_rel.append(float(diff.max()) / scale)
        assert float(diff.max()) <= REL * scale, (r, worst, float(mine[worst]), float(theirs[worst]), scale)
        big = theirs.abs() > 1e-3 * scale
        for c in src[mapped >= 0][big[mapped[mapped >= 0]]].tolist():
            compared_kinds[index.kind(c)] = compared_kinds.get(index.kind(c), 0) + 1
        n_rows += 1
    assert n_rows == 1 + n_feat, "the target and every feature after position 0 compared"
    print(f"largest difference relative to its row: {max(worst_rel):.2e} over {n_rows} rows")
    assert {"mlp_feature", "mlp_error", "embed"} <= set(compared_kinds), compared_kinds
    assert left_out > 0, "edges from pos_embed and position-0 nodes exist here only"
