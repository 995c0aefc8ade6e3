"""The trainer learns: loss falls, planted sparse features are recovered, resuming equals not stopping."""

import dataclasses
import json
import math

import pytest
import torch

from saes.dictionary import DictionarySpec, build_dictionary, encode, reconstruct
from saes.train import DictionaryTrainer, TrainConfig, train_dictionary


def planted_data(n_features=32, d=16, p_active=0.05, batch=512, seed=0, sample_seed=None):
    """Batches of sparse non-negative combinations of ``n_features`` random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=gen)
    dirs /= dirs.norm(dim=-1, keepdim=True)

    def batches():
        g = torch.Generator().manual_seed(seed + 1 if sample_seed is None else sample_seed)
        while True:
            on = torch.rand(batch, n_features, generator=g) < p_active
            mag = torch.rand(batch, n_features, generator=g) + 0.5
            yield (on * mag) @ dirs

    return dirs, batches


def normalised_mse(sae, x):
    return float((x - reconstruct(sae, x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def best_cosines(sae, dirs):
    w = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    return (dirs @ w.T).max(dim=1).values


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
def test_planted_features_are_recovered(activation, k):
    dirs, batches = planted_data()
    spec = DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation=activation, k=k)
    sae = build_dictionary(spec, seed=0)
    held_out = next(planted_data(sample_seed=1234)[1]())  # other samples of the same features
    before = normalised_mse(sae, held_out)
    cfg = TrainConfig(steps=1500, lr=3e-3, warmup_steps=20, l1_coefficient=0.3, aux_k=8, dead_after_tokens=20_000,
                      resample_every=250 if activation == "relu" else None, seed=0)
    train_dictionary(sae, batches(), cfg, progress=False)
    after = normalised_mse(sae, held_out)
    assert after < 0.25 * before and after < 0.2, (before, after)
    cos = best_cosines(sae, dirs)
    assert (cos > 0.9).float().mean() >= 0.9, f"recovered {(cos > 0.9).sum()} of {len(cos)}: {cos}"


def test_transcoder_learns_a_sparse_map():
    gen = torch.Generator().manual_seed(0)
    dirs_in, batches = planted_data(d=12, seed=3)
    dirs_out = torch.randn(32, 10, generator=gen)
    lift = torch.linalg.lstsq(dirs_in, dirs_out).solution  # [12, 10], maps each planted input to its output

    def pairs():
        for x in batches():
            yield x, x @ lift

    spec = DictionarySpec("transcoder", 0, 12, 64, 10, "in", "out", activation="topk", k=4)
    sae = build_dictionary(spec, seed=1)
    res = train_dictionary(sae, pairs(), TrainConfig(steps=600, lr=3e-3, warmup_steps=20, aux_k=8, dead_after_tokens=20_000),
                           progress=False)
    assert res.history[-1].mse < 0.1
    x = next(batches())
    assert reconstruct(sae, x).shape == (x.shape[0], 10)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "jumprelu-l0"])
def test_resume_gives_the_same_dictionary(tmp_path, activation):
    _, batches = planted_data(seed=5)
    direct = activation == "jumprelu-l0"  # JumpReLU trained directly: thresholds and their Adam state resume
    activation = "jumprelu" if direct else activation
    spec = DictionarySpec("sae", 0, 16, 32, 16, "x", "x", activation=activation, k=None if direct else 4)
    cfg = TrainConfig(steps=40, lr=3e-3, warmup_steps=5, aux_k=4, dead_after_tokens=1024, seed=2, resample_every=10,
                      l0_coefficient=0.05 if direct else None, jumprelu_bandwidth=0.1, jumprelu_init_threshold=0.1)
    straight = build_dictionary(spec, seed=0)
    train_dictionary(straight, batches(), cfg, progress=False)
    ckpt = tmp_path / "ckpt"
    first = build_dictionary(spec, seed=0)
    trainer = DictionaryTrainer(first, cfg)
    it = batches()
    for _ in range(17):
        trainer.step(next(it))
    trainer.save_checkpoint(ckpt)
    resumed = build_dictionary(spec, seed=99)  # different init: everything must come from the checkpoint
    train_dictionary(resumed, batches(), cfg, checkpoint_dir=ckpt, progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if activation == "jumprelu" else ()):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), rtol=1e-5, atol=1e-6)


def test_nan_batches_are_refused():
    spec = DictionarySpec("sae", 0, 4, 8, 4, "x", "x")
    trainer = DictionaryTrainer(build_dictionary(spec), TrainConfig(steps=5))
    with pytest.raises(ValueError, match="NaN"):
        trainer.step(torch.full((8, 4), math.nan))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="k"):
        DictionarySpec("sae", 0, 4, 8, 4, "x", "x", activation="topk", k=None)


def test_topk_limits_l0():
    spec = DictionarySpec("sae", 0, 8, 32, 8, "x", "x", activation="topk", k=3)
    sae = build_dictionary(spec)
    acts = encode(sae, torch.randn(100, 8))
    assert int((acts > 0).sum(-1).max()) <= 3


def test_batch_topk_threshold_gives_the_target_l0_and_adapts_per_token():
    """BatchTopK: after training, the learned JumpReLU threshold alone (no batch) fires on about k features a
    token on average, and tokens made of more planted features use more of them (TopK would give every token k)."""
    dirs, batches = planted_data(p_active=0.1)
    k = 4
    sae = build_dictionary(DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation="jumprelu", k=k), seed=0)
    train_dictionary(sae, batches(), TrainConfig(steps=800, lr=3e-3, warmup_steps=20, aux_k=8, dead_after_tokens=20_000),
                     progress=False)
    assert float(sae.threshold.min()) > 0 and torch.allclose(sae.threshold, sae.threshold[0].expand_as(sae.threshold))
    g = torch.Generator().manual_seed(99)
    on = torch.rand(4096, 32, generator=g) < 0.1
    x = (on * (torch.rand(4096, 32, generator=g) + 0.5)) @ dirs
    l0 = (encode(sae, x) > 0).sum(-1).float()
    assert abs(float(l0.mean()) - k) < 1.0, float(l0.mean())
    n_true = on.sum(-1).float()
    assert float(torch.corrcoef(torch.stack([l0, n_true]))[0, 1]) > 0.5
    assert normalised_mse(sae, x) < 0.2
    cos = best_cosines(sae, dirs)  # a random dictionary has none above 0.9; measured 19 of 32 here
    assert (cos > 0.9).float().mean() >= 0.5, cos


def test_jumprelu_without_a_batch_topk_target_is_refused():
    sae = build_dictionary(DictionarySpec("sae", 0, 4, 8, 4, "x", "x", activation="jumprelu"))
    with pytest.raises(ValueError, match="BatchTopK target.*l0_coefficient"):
        DictionaryTrainer(sae, TrainConfig(steps=5))


def test_batch_topk_resampling_revives_latents_that_then_fire():
    """A latent revived under BatchTopK must be able to pass the batch's threshold (a small ReLU-style restart
    never does, and dies again)."""
    _, batches = planted_data(p_active=0.1)
    sae = build_dictionary(DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation="jumprelu", k=4), seed=0)
    trainer = DictionaryTrainer(sae, TrainConfig(steps=400, lr=3e-3, warmup_steps=20, aux_k=8, dead_after_tokens=10**9))
    it = batches()
    for _ in range(100):
        trainer.step(next(it))
    dead = torch.arange(8)
    with torch.no_grad():  # kill eight latents
        sae.W_enc[:, dead] = 0.0
        sae.b_enc[dead] = -1.0
        x = next(it)
        assert not (trainer._batch_topk(x @ sae.W_enc + sae.b_enc)[:, dead] > 0).any()
    trainer.since_fired[dead] = 10**9
    assert trainer.resample_dead(x, x) == len(dead)
    with torch.no_grad():
        acts = trainer._batch_topk(next(it) @ sae.W_enc + sae.b_enc)
    assert int((acts[:, dead] > 0).any(0).sum()) >= len(dead) // 2


@pytest.mark.parametrize("activation,k", [("topk", 3), ("jumprelu", 3)])
def test_sparse_codes_give_the_dense_step_exactly(activation, k):
    """The trainer's sparse step (``Codes`` + ``embedding_bag``) has the loss, activations and gradients of the plain
    dense step, with dead latents (so the AuxK term is on) and, for BatchTopK, one row that holds far more than
    its share of the batch's top values (so the candidate window has to widen)."""
    from saes.testing import dense_trainer_loss

    sae = build_dictionary(DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation=activation, k=k), seed=3)
    trainer = DictionaryTrainer(sae, TrainConfig(steps=10, aux_k=8, dead_after_tokens=100))
    trainer.since_fired[::3] = 1000  # a third of the latents are dead
    g = torch.Generator().manual_seed(0)
    x_in, x_out = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    x_in[5] *= 50  # row 5 dominates the batch's top values
    grads = []
    for fn in (lambda: trainer.loss(x_in, x_out), lambda: dense_trainer_loss(trainer, x_in, x_out)):
        for p in trainer.params:
            p.grad = None
        out = fn()
        out[0].backward()
        dense = out[2].dense(64) if len(out) == 4 else out[1]
        grads.append((out[0].detach(), dense.detach(), [p.grad.clone() for p in trainer.params]))
    (l_s, a_s, g_s), (l_d, a_d, g_d) = grads
    if activation == "jumprelu":
        assert int((a_d[5] > 0).sum()) > 4 * k  # the widening case was exercised
    assert torch.equal(a_s > 0, a_d > 0) and torch.allclose(a_s, a_d)
    assert torch.allclose(l_s, l_d, rtol=1e-5)
    for gs, gd in zip(g_s, g_d):
        assert torch.allclose(gs, gd, rtol=1e-4, atol=1e-5 * float(gd.abs().max()))


def test_matryoshka_prefix_reconstructs_alone_and_resumes(tmp_path):
    """With Matryoshka prefixes the first m latents alone reconstruct the data far better than the same first m
    latents of a dictionary trained without them (which spreads the planted features over all 64); a checkpoint
    written with prefixes resumes (the tuple survives JSON)."""
    from saes.train import Codes

    _, batches = planted_data(n_features=8, p_active=0.2)
    x = next(batches())

    def prefix_mse(cfg):
        sae = build_dictionary(DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation="topk", k=4), seed=0)
        train_dictionary(sae, batches(), cfg, progress=False, checkpoint_dir=tmp_path / str(cfg.matryoshka))
        with torch.no_grad():
            vals, idx = (x @ sae.W_enc + sae.b_enc).topk(4, dim=-1)
            recon = Codes.from_slots(vals.relu(), idx).prefix(8).decode(sae.W_dec, sae.b_dec)
        return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    base = TrainConfig(steps=300, lr=3e-3, warmup_steps=20, aux_k=8)
    nested, plain = prefix_mse(dataclasses.replace(base, matryoshka=[8, 32])), prefix_mse(base)
    assert nested < 0.3 and nested < 0.5 * plain, (nested, plain)
    sae = build_dictionary(DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation="topk", k=4), seed=0)
    DictionaryTrainer(sae, dataclasses.replace(base, matryoshka=(8, 32))).load_checkpoint(tmp_path / "(8, 32)")
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(steps=5, matryoshka=(32, 8))
    with pytest.raises(ValueError, match="below its d_sae"):
        DictionaryTrainer(sae, TrainConfig(steps=5, matryoshka=(64,)))


def test_jumprelu_trained_directly_learns_per_latent_thresholds_and_the_features():
    """JumpReLU with an L0 penalty (no BatchTopK target): the thresholds learn, one per latent, through the
    straight-through estimator; L0 falls to about the planted data's own, and the planted directions are found.
    Measured here: L0 3.1 against 3.2 planted, 28 of 32 directions above 0.9."""
    dirs, batches = planted_data(p_active=0.1)
    sae = build_dictionary(DictionarySpec("sae", 0, 16, 64, 16, "x", "x", activation="jumprelu"), seed=0)
    cfg = TrainConfig(steps=3000, lr=3e-3, warmup_steps=20, l0_coefficient=0.05, jumprelu_bandwidth=0.1,
                      jumprelu_init_threshold=0.1, dead_after_tokens=20_000)
    train_dictionary(sae, batches(), cfg, progress=False)
    th = sae.threshold.detach()
    assert float(th.min()) > cfg.jumprelu_init_threshold and float(th.std()) > 0.01, th  # raised, and per latent
    g = torch.Generator().manual_seed(99)
    on = torch.rand(4096, 32, generator=g) < 0.1
    x = (on * (torch.rand(4096, 32, generator=g) + 0.5)) @ dirs
    l0 = float((encode(sae, x) > 0).sum(-1).float().mean())
    assert abs(l0 - float(on.sum(-1).float().mean())) < 1.0, l0
    assert normalised_mse(sae, x) < 0.2
    assert (best_cosines(sae, dirs) > 0.9).float().mean() >= 0.75


def test_jumprelu_pseudo_derivatives():
    """The straight-through estimator of Rajamanoharan et al. 2024: d/dtheta of pre * H(pre - theta) is
    -theta / eps inside the kernel's window around theta and 0 outside; of H(pre - theta), -1 / eps; the
    JumpReLU passes the gradient to pre where it fires; the step passes none to pre."""
    from saes.train import _JumpReLU, _Step

    eps = 0.2
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    pre = torch.tensor([[0.45, 0.58, 0.75, 0.2]], requires_grad=True)  # in the window (2), above, below
    out = _JumpReLU.apply(pre, theta, eps)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, 0.58, 0.75, 0.0]]))
    out.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-0.5 / eps, -0.5 / eps, 0.0, 0.0]))
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    theta.grad = pre.grad = None
    _Step.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-1 / eps, -1 / eps, 0.0, 0.0]))
    assert pre.grad is None or not pre.grad.any()


def test_l0_coefficient_needs_a_jumprelu_without_target():
    with pytest.raises(ValueError, match="l0_coefficient"):
        DictionaryTrainer(build_dictionary(DictionarySpec("sae", 0, 4, 8, 4, "x", "x", activation="topk", k=2)),
                          TrainConfig(steps=5, l0_coefficient=0.1))
    with pytest.raises(ValueError, match="l0_coefficient"):
        TrainConfig(steps=5, l0_coefficient=-1.0)


def test_resume_refuses_other_settings_by_name_and_accepts_fields_added_since(tmp_path):
    _, batches = planted_data(seed=5)
    spec = DictionarySpec("sae", 0, 16, 32, 16, "x", "x", activation="topk", k=4)
    cfg = TrainConfig(steps=10, lr=3e-3, warmup_steps=2, aux_k=4)
    trainer = DictionaryTrainer(build_dictionary(spec, seed=0), cfg)
    trainer.step(next(batches()))
    trainer.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="differs in lr"):
        DictionaryTrainer(build_dictionary(spec, seed=0), dataclasses.replace(cfg, lr=1e-3)).load_checkpoint(tmp_path)
    meta = json.loads((tmp_path / "trainer.json").read_text())
    for field in ("matryoshka", "l0_coefficient", "jumprelu_bandwidth"):  # as written before these fields existed
        del meta["config"][field]
    (tmp_path / "trainer.json").write_text(json.dumps(meta))
    resumed = DictionaryTrainer(build_dictionary(spec, seed=1), cfg)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step_count == 1
    torch.testing.assert_close(resumed.sae.W_enc, trainer.sae.W_enc)
    meta["config"]["l0_coefficient"] = 0.5
    (tmp_path / "trainer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs in l0_coefficient"):
        DictionaryTrainer(build_dictionary(spec, seed=0), cfg).load_checkpoint(tmp_path)
