"""MNIST pipeline on tiny synthetic IDX files written here (the real data is never needed): the IDX reader reads
hand-written bytes back, the test-set-only split is seeded and disjoint, the pieces of Exp1-3 compute what they
claim on hand-built inputs, and a few-step run of every experiment writes a complete results.json."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from analysis.mnist_data import load_mnist_idx, read_idx
from analysis.mnist_experiments import (MnistConfig, angle_degrees, direction_clusters, key_features, main_directions_angle,
                                       rank_importance, run_mnist, shuffle_units)
from analysis.mnist_models import HiddenAutoencoder, loss_shares, train_hidden_autoencoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """The IDX format written by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten random 28x28 templates, one per label, plus noise: learnable in a few epochs, and not MNIST."""
    rng = np.random.default_rng(seed)
    templates = (rng.random((10, 28, 28)) > 0.7) * 200
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.clip(templates[labels] + rng.normal(0, 30, (n, 28, 28)), 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def test_set_only(tmp_path):
    images, labels = synthetic_digits(300)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_idx_reader_reads_hand_written_bytes(tmp_path):
    images, labels = synthetic_digits(7)
    write_idx(tmp_path / "i.gz", images)
    write_idx(tmp_path / "l", labels, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "i.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), labels)
    assert read_idx(tmp_path / "i.gz").shape == (7, 28, 28)


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad is not a valid IDX file: bad magic number"):
        read_idx(tmp_path / "bad")
    images, _ = synthetic_digits(3)
    write_idx(tmp_path / "short", images, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "short")


def test_test_set_only_is_split_by_a_fixed_seed(test_set_only):
    folder, images, labels = test_set_only
    a, b = load_mnist_idx(folder, seed=0), load_mnist_idx(folder, seed=0)
    assert (len(a.train_images), len(a.test_images)) == (240, 60)
    torch.testing.assert_close(a.train_images, b.train_images)
    assert "split by seed 0" in a.source["split"] and a.source["n_train"] == 240
    # Disjoint and complete: every original image lands in exactly one part, with its own label.
    everything = torch.cat([a.train_images, a.test_images])
    all_labels = torch.cat([a.train_labels, a.test_labels])
    flat = torch.from_numpy(images.reshape(300, 784).astype(np.float32) / 255)
    match = (everything[:, None, :] == flat[None]).all(-1)
    assert (match.sum(0) == 1).all() and (match.sum(1) == 1).all()
    assert torch.equal(all_labels, torch.from_numpy(labels.astype(np.int64))[match.int().argmax(1)])
    assert not torch.equal(load_mnist_idx(folder, seed=1).train_images, a.train_images)


def test_standard_split_when_training_images_exist(test_set_only):
    folder, _, _ = test_set_only
    images, labels = synthetic_digits(50, seed=1)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    data = load_mnist_idx(folder)
    assert (len(data.train_images), len(data.test_images)) == (50, 300)
    assert data.source["split"].startswith("standard")


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_mnist_idx(tmp_path)


def test_key_features_take_the_fewest_carrying_half_the_mass():
    dist = torch.zeros(98)
    dist[[3, 40, 7]] = torch.tensor([0.3, 0.25, 0.1])
    dist[50:] = 0.35 / 48
    assert key_features(dist) == [3, 40]  # 0.3 + 0.25 >= 0.5
    flat = torch.full((98,), 1 / 98)
    assert len(key_features(flat)) == 5  # never more than 5


def test_loss_shares_are_zero_for_an_unused_feature_and_sum_to_one():
    ae = HiddenAutoencoder(4, 2)
    with torch.no_grad():
        ae.W.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.7], [0.0, 1.0, 0.0, -0.7]]))
        ae.b.zero_()
    a = torch.rand(500, 4, generator=torch.Generator().manual_seed(0))
    shares = loss_shares(ae, a)
    assert float(shares.sum()) == pytest.approx(1.0)
    assert float(shares[2]) == 0.0 and float(shares[0]) > 0.1


def test_direction_clusters_count_distinct_directions():
    arrows = torch.tensor([[1.0, 0.0], [0.9, 0.05], [-1.0, 0.0], [0.0, 0.05]])  # the last is too short to count
    assert direction_clusters(arrows) == 2
    assert direction_clusters(torch.zeros(3, 2)) == 0


def test_rank_importance_follows_the_mean_square():
    acts = torch.tensor([[1.0, 3.0, 0.0], [1.0, 3.0, 2.0]])  # mean squares 1, 9, 2
    torch.testing.assert_close(rank_importance(acts, 0.5), torch.tensor([0.25, 1.0, 0.5]))


def test_angle_between_arrows():
    assert angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(90.0)
    assert angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.01])) == pytest.approx(179.43, abs=0.01)


def test_importance_weighting_moves_the_loss_shares():
    """Two orthogonal features and one on the diagonal: weighting a feature's error up raises its share."""
    ae = HiddenAutoencoder(3, 2)
    with torch.no_grad():
        ae.W.copy_(torch.tensor([[1.0, 0.0, 0.7], [0.0, 1.0, 0.7]]))
        ae.b.zero_()
    a = torch.rand(500, 3, generator=torch.Generator().manual_seed(0))
    plain = loss_shares(ae, a)
    weighted = loss_shares(ae, a, torch.tensor([1.0, 0.01, 0.01]))
    assert float(weighted[0]) > float(plain[0]) + 0.2 and float(weighted.sum()) == pytest.approx(1.0)


def tiny_config(**kw) -> MnistConfig:
    base = dict(classifier_epochs=8, ae_epochs=3, ae_repeats_per_epoch=2, ae_batch_size=64, sae_steps=150,
                sae_batch_size=64, decoder_epochs=2, exp2_sparsity=0.9)
    base.update(kw)
    return MnistConfig(**base)


def test_every_experiment_writes_a_complete_results_json(test_set_only, tmp_path):
    folder, _, _ = test_set_only
    data = load_mnist_idx(folder)
    out = tmp_path / "out"
    run_mnist(data, tiny_config(), (1, 2, 3), out, progress=False, png=False)
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["n_train"] == 240 and "split by seed" in res["data"]["split"]
    assert res["classifier"]["test_accuracy"] > 0.9  # the synthetic digits are learnable: training works
    for exp in ("exp1", "exp2", "exp1_weighted", "exp2_weighted", "exp1_weighted_independent"):
        assert len(res[exp]["per_epoch"]) == 3
        last = res[exp]["per_epoch"][-1]
        lengths = np.hypot(*zip(*last["arrows"]))
        assert len(last["arrows"]) == 49 and max(lengths) == pytest.approx(1.0, abs=1e-3)
        assert sum(last["loss_shares"]) == pytest.approx(1.0, abs=1e-3)
        assert last["n_long"] == int((lengths > 0.5 + 1e-4).sum()) and 0 <= last["top2_angle_degrees"] <= 180
        assert sorted(lengths)[-2] == pytest.approx(last["top2_lengths"][1], abs=1e-3)
        assert last["n_represented_directions"] <= last["n_represented"]
    assert res["exp1"]["importance"] is None and max(res["exp1_weighted"]["importance"]) == 1.0
    assert "exp2_weighted_independent" not in res and res["exp1_weighted_independent"]["independent_units_control"]
    # Weighted runs draw each arrow with length = its importance (the loss weight): 1, 0.7, 0.49, ... by rank.
    last = res["exp1_weighted"]["per_epoch"][-1]
    np.testing.assert_allclose(np.hypot(*zip(*last["arrows"])), res["exp1_weighted"]["importance"], atol=2e-4)
    assert last["n_long"] == 2 and res["exp1_weighted"]["ae_input"] == "raw"
    # Unweighted runs: length = the measured loss share.
    last = res["exp1"]["per_epoch"][-1]
    np.testing.assert_allclose(np.hypot(*zip(*last["arrows"])), np.array(last["loss_shares"]) / max(last["loss_shares"]), atol=2e-3)
    assert res["exp2"]["sparsity"] == 0.9
    e3 = res["exp3"]
    assert 0 <= e3["sae"]["dead_fraction"] <= 1 and e3["sae"]["l0_test"] > 0
    assert e3["accuracy_clean"] == pytest.approx(res["classifier"]["test_accuracy"])
    assert len(e3["digits"]) == 10
    for row in e3["digits"]:
        assert 2 <= len(row["key_features"]) <= 5 and all(0 <= k < 98 for k in row["key_features"])
        assert 0 <= row["predicted_from_image"] <= 9
    assert e3["generated_read_as_intended_from_image"] == sum(r["predicted_from_image"] == r["digit"] for r in e3["digits"])
    for name, files in res["figures"].items():
        assert (out / files["html"]).stat().st_size > 100_000  # plotly.js is inline: the page works offline
        assert files["png"] is None


def test_cli_runs_one_experiment(test_set_only, tmp_path):
    from scripts.cli import main

    folder, _, _ = test_set_only
    out = tmp_path / "cli"
    rc = main(["mnist", "--mnist-dir", str(folder), "--exp", "1", "--out", str(out), "--no-png", "--no-progress",
               "--classifier-epochs", "2", "--ae-epochs", "1", "--ae-repeats", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiments_run"] == [1] and "exp1" in res and "exp3" not in res


@pytest.mark.parametrize("damage", ["not_gzip", "cut_gzip", "cut_raw"])
def test_cli_names_a_corrupt_idx_file_and_writes_nothing(test_set_only, tmp_path, capsys, damage):
    from scripts.cli import main

    folder, images, _ = test_set_only
    gz = folder / "t10k-images-idx3-ubyte.gz"
    if damage == "not_gzip":
        gz.write_bytes(b"<html>404 Not Found</html>" * 10)  # what a failed download often leaves
        bad = gz
    elif damage == "cut_gzip":
        gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
        bad = gz
    else:
        gz.unlink()
        bad = folder / "t10k-images-idx3-ubyte"
        write_idx(bad, images, compress=False)
        bad.write_bytes(bad.read_bytes()[:-100])
    out = tmp_path / "o"
    assert main(["mnist", "--mnist-dir", str(folder), "--exp", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad} is not a valid IDX file" in err and "re-download it" in err, err
    assert not out.exists()


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    from scripts.cli import main

    assert main(["mnist", "--mnist-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_main_directions_are_the_two_heaviest_groups_of_long_arrows():
    deg = torch.deg2rad(torch.tensor([350.0, 10.0, 90.0, 200.0, 45.0]))
    lengths = torch.tensor([1.0, 0.8, 0.6, 0.55, 0.2])  # the last is short: not counted
    arrows = torch.stack([lengths * torch.cos(deg), lengths * torch.sin(deg)], dim=-1)
    # 350 and 10 degrees are one group (it straddles 0), pointing along their sum (about -1.1 degrees).
    assert direction_clusters(arrows, min_length=0.5) == 3
    assert main_directions_angle(arrows) == pytest.approx(90.0 + 1.11, abs=0.05)
    assert main_directions_angle(arrows[[0, 1]]) is None


def test_shuffling_units_keeps_marginals_and_removes_correlation():
    x = torch.rand(4000, 1, generator=torch.Generator().manual_seed(0))
    acts = torch.cat([x, 2 * x, x.pow(2)], dim=1)  # perfectly dependent units
    shuffled = shuffle_units(acts, torch.Generator().manual_seed(1))
    torch.testing.assert_close(shuffled.sort(0).values, acts.sort(0).values)
    corr = torch.corrcoef(shuffled.T)
    assert corr[~torch.eye(3, dtype=torch.bool)].abs().max() < 0.06


def test_correlated_units_bend_the_top_two_from_orthogonal_and_independent_ones_do_not():
    """The Exp1 control in miniature: six units sharing a common factor, importance 0.7^j. The 2-D autoencoder
    then spends its dimensions on shared directions and the two most important units end up far from 90 degrees;
    shuffled to independence (same marginals), it is the toy model: those two orthogonal, the rest dropped."""
    gen = torch.Generator().manual_seed(0)
    acts = 0.5 * torch.rand(3000, 6, generator=gen) + 0.5 * torch.rand(3000, 1, generator=gen)
    importance = 0.7 ** torch.arange(6.0)
    results = []
    for a in (acts, shuffle_units(acts, torch.Generator().manual_seed(1))):
        _, snaps = train_hidden_autoencoder(a, a, 1.0, epochs=1, repeats_per_epoch=150, batch_size=256, lr=1e-2,
                                            progress=False, importance=importance)
        W = snaps[-1]["W"]
        results.append((angle_degrees(W[:, 0], W[:, 1]), float(W[:, 2:].norm(dim=0).max())))
    (bent, rest_bent), (straight, rest_straight) = results
    assert abs(bent - 90) > 10 and rest_bent > 0.2, results
    assert abs(straight - 90) < 2 and rest_straight < 0.1, results
