"""Toy models of superposition: the batched model equals its instances trained alone, the dense linear model
keeps exactly the top-m features, the superposition measures are right on hand-built weights, and an SAE from
``saes/`` recovers planted directions."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.superposition import (angular_gaps_2d, antipodal_pairs, dimensions_per_feature, feature_dimensionality,
                                    feature_dimensionality_represented, feature_norms, fraction_lines, interference, summarize_instance)
from analysis.toy_experiments import best_cosines, best_replicas, hidden_activations, per_instance
from analysis.toy_models import (ToyConfig, ToyModel, evaluate_loss, geometric_importance, paired_chunk_losses,
                                 probability_sweep, sample_features, train_toy_model)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_toy_config(**overrides) -> ToyConfig:
    kw = dict(n_features=6, n_hidden=2, feature_probability=(1.0, 0.3, 0.05), importance=geometric_importance(6, 0.8),
              steps=60, batch_size=64, seed=3)
    kw.update(overrides)
    return ToyConfig(**kw)


def test_batched_instances_train_exactly_as_alone():
    cfg = make_toy_config()
    model = ToyModel(cfg, dtype=torch.float64)
    init_W, init_b = model.W.detach().clone(), model.b.detach().clone()
    gen = torch.Generator().manual_seed(11)
    batches = [sample_features(cfg, cfg.batch_size, gen, torch.float64) for _ in range(cfg.steps)]
    train_toy_model(cfg, model=model, batches=batches, progress=False)
    assert not torch.allclose(model.W, init_W), "training must move the weights"
    for i, p in enumerate(cfg.feature_probability):
        alone_cfg = make_toy_config(feature_probability=(p,))
        alone = ToyModel(alone_cfg, dtype=torch.float64)
        with torch.no_grad():
            alone.W.copy_(init_W[i : i + 1])
            alone.b.copy_(init_b[i : i + 1])
        train_toy_model(alone_cfg, model=alone, batches=[b[i : i + 1] for b in batches], progress=False)
        torch.testing.assert_close(alone.W[0], model.W[i], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(alone.b[0], model.b[i], rtol=1e-9, atol=1e-10)


def test_sampler_has_the_asked_sparsity_and_range():
    cfg = make_toy_config(feature_probability=(1.0, 0.2))
    x = sample_features(cfg, 20_000, torch.Generator().manual_seed(0))
    present = (x > 0).float().mean(dim=(1, 2))
    assert abs(float(present[0]) - 1.0) < 1e-3 and abs(float(present[1]) - 0.2) < 0.01
    nz = x[1][x[1] > 0]
    assert 0 < float(nz.min()) and float(nz.max()) <= 1 and abs(float(nz.mean()) - 0.5) < 0.01  # uniform on [0, 1]


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_dense_model_keeps_exactly_the_top_m_features(activation):
    """Dense (S = 0): W^T W is the identity on the m most important features and 0 elsewhere (paper, section 2)."""
    n, m = 6, 3
    cfg = ToyConfig(n, m, (1.0,), geometric_importance(n, 0.7), activation=activation, steps=1500, batch_size=256,
                    lr=1e-2, weight_decay=0.0, seed=0)
    run = train_toy_model(cfg, progress=False)
    W = run.model.W[0]
    target = torch.zeros(n, n)
    target[:m, :m] = torch.eye(m)
    assert float((W.T @ W - target).abs().max()) < 0.1
    assert summarize_instance(W)["n_represented"] == m


def test_probability_sweep_matches_the_notebook():
    ours = torch.tensor(probability_sweep(10, 0.05))
    notebook = 20 ** -torch.linspace(0, 1, 10)
    torch.testing.assert_close(ours, notebook.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_measures_on_hand_built_geometries():
    # Two features on their own axes, one dropped: D* = 1, dimensionalities 1, 1, 0; no interference.
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(dimensions_per_feature(W)) == pytest.approx(1.0)
    torch.testing.assert_close(feature_dimensionality(W), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(interference(W), torch.zeros(3))
    # An antipodal pair in one dimension: each holds half a dimension.
    W = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(feature_dimensionality(W), torch.tensor([0.5, 0.5]))
    assert float(dimensions_per_feature(W)) == pytest.approx(0.5)
    assert antipodal_pairs(W) == [(0, 1)]
    # A regular pentagon in 2-D: each feature holds 2/5 of a dimension; gaps of 72 degrees.
    ang = torch.arange(5) * 2 * math.pi / 5
    W = torch.stack([ang.cos(), ang.sin()])
    torch.testing.assert_close(feature_dimensionality(W), torch.full((5,), 0.4), rtol=1e-5, atol=1e-5)
    assert angular_gaps_2d(W) == pytest.approx([72.0] * 5, abs=0.01)
    torch.testing.assert_close(feature_norms(W), torch.ones(5))


def test_best_replica_is_the_lowest_loss_per_sparsity():
    cfg = make_toy_config(feature_probability=(1.0, 1.0, 0.1, 0.1))
    assert best_replicas(cfg, [0.3, 0.2, 0.1, 0.4]) == [1, 2]


def test_topk_sae_recovers_planted_directions():
    """h = W x with 5 sparse features in 2-D (a pentagon, as the sparse n=5, m=2 model learns): the ``saes/``
    trainer's TopK SAE finds every direction; a random dictionary does not."""
    from saes.dictionary import DictionarySpec, build_dictionary
    from saes.train import TrainConfig, train_dictionary

    ang = torch.arange(5) * 2 * math.pi / 5 + 0.3
    W = torch.stack([ang.cos(), ang.sin()]) * 1.1
    spec = DictionarySpec(kind="sae", layer=0, d_in=2, d_sae=8, d_out=2, hook_in="toy.hidden", hook_out="toy.hidden",
                          activation="topk", k=1)
    sae = build_dictionary(spec, seed=0)
    before, _ = best_cosines(W, sae.W_dec.detach())
    data = hidden_activations(W, 0.05, 1000 * 256, seed=1).split(256)
    cfg = TrainConfig(steps=1000, lr=3e-3, warmup_steps=50, dead_after_tokens=20 * 256, aux_k=4, resample_every=100, seed=0)
    train_dictionary(sae, data, cfg, progress=False)
    after, _ = best_cosines(W, sae.W_dec.detach())
    assert min(after) > 0.98, after
    assert min(before) < 0.9  # the test can fail: a random 8-latent dictionary misses some direction


def test_config_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="importance"):
        ToyConfig(5, 2, (1.0,), (1.0,) * 4)
    with pytest.raises(ValueError, match="n_hidden"):
        ToyConfig(2, 5, (1.0,), (1.0,) * 2)
    with pytest.raises(ValueError, match="feature_probability"):
        ToyConfig(5, 2, (0.0,), (1.0,) * 5)


def test_notebook_init_is_xavier_over_the_joint_tensor():
    """The notebook calls xavier_normal_ on its [instance, n, m] W: fan_in = n * m, fan_out = instances * m."""
    cfg = ToyConfig(200, 20, (1.0,) * 20, (1.0,) * 200, init="notebook")
    W = ToyModel(cfg).W.detach()
    reference = torch.empty(20, 200, 20)
    torch.nn.init.xavier_normal_(reference)
    assert float(W.std()) == pytest.approx(float(reference.std()), rel=0.01)
    assert float(W.std()) == pytest.approx(math.sqrt(2 / (200 * 20 + 20 * 20)), rel=0.01)
    per_instance_std = float(ToyModel(ToyConfig(200, 20, (1.0,) * 20, (1.0,) * 200)).W.detach().std())
    assert per_instance_std == pytest.approx(math.sqrt(2 / (20 + 200)), rel=0.01)
    with pytest.raises(ValueError, match="init"):
        make_toy_config(init="kaiming")


def test_fraction_lines_tell_a_sharp_cluster_from_a_band():
    cluster = [0.75] * 12 + [0.5] * 3
    band = [0.70025 + 0.001 * k for k in range(70)]  # evenly from 0.70 to 0.77: no cluster anywhere
    assert fraction_lines(band)["3/4"] == {"at": 10, "below": 10, "above": 10}
    lines = fraction_lines(cluster + band)
    assert lines["3/4"] == {"at": 22, "below": 10, "above": 10}
    assert lines["1/2"] == {"at": 3, "below": 0, "above": 0}


def test_dimensionality_over_represented_features_sees_a_tetrahedron_through_small_columns():
    tetra = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]).T / 3**0.5  # [3, 4], cosines -1/3
    W = torch.zeros(4, 4 + 40)
    W[:3, :4] = tetra
    W[3, 4] = 1.0  # a lone feature in the fourth dimension
    W[:, 5:] = 0.2 * torch.randn(4, 39, generator=torch.Generator().manual_seed(0)) / 2  # small, unrepresented
    full, rep = feature_dimensionality(W), feature_dimensionality_represented(W)
    assert (full[:4] < 0.72).all() and full[4] < 0.9  # the small columns pull the paper's measure down
    torch.testing.assert_close(rep[:4], torch.full((4,), 0.75))
    torch.testing.assert_close(rep[4], torch.tensor(1.0))
    assert rep[5:].isnan().all()
    assert summarize_instance(W)["feature_dimensionality_represented"][:5] == [0.75] * 4 + [1.0]


def test_paired_losses_give_equal_replicas_equal_losses_and_pick_the_better_one():
    cfg = make_toy_config(feature_probability=(0.05, 0.05, 0.05), steps=1)
    model = ToyModel(cfg, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        model.W.zero_()
        model.W[:2, 0, 0] = model.W[:2, 1, 1] = 1.0  # replicas 0 and 1: features 0 and 1 kept; replica 2: nothing
    chunks = paired_chunk_losses(model, n_samples=8 * 512, chunk=512)
    assert chunks.shape == (8, 3)
    torch.testing.assert_close(chunks[:, 0], chunks[:, 1], rtol=0, atol=0)  # same inputs, same weights: identical
    assert float(chunks.mean(0)[2]) > float(chunks.mean(0)[0])
    # The paired mean agrees with the independent-sample estimate.
    assert float(chunks.mean(0)[0]) == pytest.approx(evaluate_loss(model, n_samples=8192)[0], rel=0.1)
    rows = per_instance(cfg, model, chunks.mean(0).tolist(), [0], chunks)
    assert rows[0]["replica_excess_loss_relative"][:2] == [0.0, 0.0] and rows[0]["replica_excess_loss_relative"][2] > 0
    assert rows[0]["kept_replica_clearly_best"] is False  # replica 1 ties with it
