"""Superposition in an MNIST classifier (docs/experiments.md, section 2), on the ``saes/`` trainer.

0. Train the 784-49-10 ReLU classifier; its 49 hidden activations are the "features" of what follows. The
   autoencoders of Exp1/Exp2 read them as they are (``ae_input="raw"``, as the original describes), or each unit
   divided by its maximum over the training set (``"max_scaled"``, features in [0, 1] as in the toy model).
1. Exp1 (dense): the toy autoencoder 49 -> 2 -> 49 on those activations, ``a' = ReLU(W^T W a + b)``. Per epoch,
   each feature is drawn as an arrow along its column of W, its length the feature's *importance*, normalised so
   the longest is 1 (the arrows lie in [-1, 1], as the original draws them). Importance, "how much it contributes
   to the reconstruction loss", is read two ways:
   - with an importance-weighted loss (as in the toy model, where importance ``I_j`` is the weight of feature j's
     squared error in the loss): the arrow's length is ``I_j``;
   - with the unweighted loss (every ``I_j`` equal, so the weight says nothing): the arrow's length is the
     feature's measured share of the loss (the loss rise when its column is removed).
   Measured per epoch: the *long* arrows (> 0.5), the angle between the two longest (the two most important
   features), the angle between the two main directions (the two heaviest groups of long arrows), how many
   distinct directions the long arrows point in, and, as the toy models count, the features with ``||W_j|| > 0.5``.
2. Exp2 (sparse): the same with each feature kept with probability ``1 - S`` (S = 0.999 by default).
1w/2w. The importance-weighted runs: importance ``base ** rank`` (base 0.7 as the paper's n=20 model), rank 0 the
   unit with the largest mean square (the largest contribution to an unweighted reconstruction loss).
1i. A control for Exp1 weighted: the same run on activations whose units are shuffled independently across the
   training images: the same marginals, no correlations between units (as the toy model's independent features).
   If the two most important directions are orthogonal here but not on the real activations, the correlations
   between the classifier's units are what bends them.
3. Exp3: an SAE with 98 latents (``saes.train``, ReLU + L1, dead-latent resampling) on the 49 raw hidden
   activations, and an image decoder 49 -> 784. Per digit: the mean activation of each latent over that digit's
   training images, normalised to sum 1 (with the 90th-percentile and 1/98 lines). Key features: the fewest
   top latents that carry half of that mass, at least 2 and at most 5. Generated image: only the key latents on,
   each at its mean activation on the digit's images where it fires, decoded through the SAE and the image
   decoder; the classifier then reads the image. Also: the classifier's accuracy with the hidden layer replaced
   by the SAE reconstruction, the SAE's explained variance, L0 and dead fraction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from analysis.mnist_data import MnistData
from analysis.mnist_models import (MnistClassifier, accuracy, train_classifier, train_hidden_autoencoder,
                                   train_image_decoder)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MnistConfig:
    classifier_epochs: int = 15
    ae_epochs: int = 20
    ae_repeats_per_epoch: int = 64  # passes over the training activations per epoch (fresh masks each)
    ae_batch_size: int = 1024
    exp2_sparsity: float = 0.999
    sae_latents: int = 98
    sae_steps: int = 6000
    sae_batch_size: int = 256
    sae_l1_coefficient: float = 0.03
    decoder_epochs: int = 20
    weighted_importance_base: float | None = 0.7  # also run Exp1/Exp2 with importance base**rank (None: skip)
    ae_input: str = "raw"  # "raw" hidden activations (as the original), or "max_scaled" (each unit / its max)
    independent_control: bool = True  # also run Exp1 weighted on unit-wise shuffled (independent) activations
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.exp2_sparsity < 1:
            raise ValueError(f"exp2_sparsity must be in [0, 1), got {self.exp2_sparsity}")
        if min(self.classifier_epochs, self.ae_epochs, self.ae_repeats_per_epoch, self.ae_batch_size, self.sae_latents,
               self.sae_steps, self.sae_batch_size, self.decoder_epochs) <= 0:
            raise ValueError("every epoch count, step count, batch size and width must be positive")
        if self.ae_input not in ("raw", "max_scaled"):
            raise ValueError(f"ae_input must be 'raw' or 'max_scaled', got {self.ae_input!r}")
        if self.weighted_importance_base is not None and not 0 < self.weighted_importance_base <= 1:
            raise ValueError(f"weighted_importance_base must be in (0, 1] or None, got {self.weighted_importance_base}")


REPRESENTED_NORM = 0.5
LONG_ARROW = 0.5  # a drawn arrow (importance normalised so the longest is 1) longer than this counts as long


def feature_scale(acts: torch.Tensor) -> torch.Tensor:
    """Per-unit maximum over the training set (1 for a unit that never fires), so scaled features lie in [0, 1]."""
    m = acts.max(0).values
    return torch.where(m > 0, m, torch.ones_like(m))


def direction_groups(arrows: torch.Tensor, min_length: float = 0.1, gap_degrees: float = 30.0) -> list[torch.Tensor]:
    """The distinct directions the drawn arrows (``[feature, 2]``) point in: the arrows longer than ``min_length``,
    sorted by angle and split into groups wherever neighbours (going round the circle) are more than ``gap_degrees``
    apart. Returns each group's arrows (``[k, 2]``)."""
    long = arrows[arrows.norm(dim=-1) > min_length]
    if len(long) == 0:
        return []
    angles = torch.rad2deg(torch.atan2(long[:, 1], long[:, 0])).remainder(360)
    order = angles.argsort()
    angles, long = angles[order], long[order]
    gaps = torch.diff(torch.cat([angles, angles[:1] + 360]))
    cuts = torch.nonzero(gaps > gap_degrees).flatten().tolist()  # a group ends after each big gap
    if len(cuts) <= 1:
        return [long]
    # Start after the last cut so that a group straddling 0 degrees stays whole.
    start = cuts[-1] + 1
    rolled = torch.roll(long, -start, dims=0)
    ends = [(c - start) % len(long) + 1 for c in cuts]
    ends.sort()
    return [rolled[a:b] for a, b in zip([0] + ends[:-1], ends)]


def direction_clusters(arrows: torch.Tensor, min_length: float = 0.1, gap_degrees: float = 30.0) -> int:
    """How many distinct directions the drawn arrows point in (``direction_groups``)."""
    return len(direction_groups(arrows, min_length, gap_degrees))


def main_directions_angle(arrows: torch.Tensor, min_length: float = 0.5, gap_degrees: float = 30.0) -> float | None:
    """The angle between the two main directions of a drawing: the two groups of long arrows (``direction_groups``)
    with the largest summed length, each pointing along the sum of its arrows. None with fewer than two groups."""
    groups = direction_groups(arrows, min_length, gap_degrees)
    if len(groups) < 2:
        return None
    heaviest = sorted(groups, key=lambda g: float(g.norm(dim=-1).sum()), reverse=True)[:2]
    return angle_degrees(heaviest[0].sum(0), heaviest[1].sum(0))


def shuffle_units(acts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each unit (column) permuted independently across rows: the same marginals, no correlation between units."""
    return torch.stack([col[torch.randperm(len(col), generator=gen)] for col in acts.T], dim=1)


def rank_importance(acts: torch.Tensor, base: float) -> torch.Tensor:
    """Importance ``base ** rank``, rank 0 for the unit with the largest mean square (its contribution to an
    unweighted reconstruction loss when it is not reconstructed at all)."""
    rank = acts.pow(2).mean(0).argsort(descending=True).argsort()
    return base ** rank.to(acts.dtype)


def angle_degrees(u: torch.Tensor, v: torch.Tensor) -> float:
    """The angle between two 2-D vectors, in [0, 180]."""
    cos = float(u @ v / (u.norm() * v.norm()).clamp_min(1e-12))
    return round(float(torch.rad2deg(torch.arccos(torch.tensor(max(-1.0, min(1.0, cos)))))), 2)


def run_autoencoder_experiment(name: str, train_acts: torch.Tensor, test_acts: torch.Tensor, sparsity: float,
                               c: MnistConfig, progress: bool, importance: torch.Tensor | None = None,
                               independent: bool = False) -> tuple[dict, list[dict]]:
    """One Exp1/Exp2 run. Arrow length: the loss weight ``importance`` when given, else the measured loss share.
    ``independent``: shuffle each unit across images first (the control of the module docstring, step 1i)."""
    if independent:
        gen = torch.Generator().manual_seed(c.seed + 5)
        train_acts, test_acts = shuffle_units(train_acts, gen), shuffle_units(test_acts, gen)
    scale = feature_scale(train_acts) if c.ae_input == "max_scaled" else torch.ones(train_acts.shape[1])
    ae, snaps = train_hidden_autoencoder(train_acts / scale, test_acts / scale, 1 - sparsity, c.ae_epochs, c.ae_repeats_per_epoch,
                                         c.ae_batch_size, seed=c.seed, progress=progress, desc=name, importance=importance)
    corr = torch.corrcoef((train_acts / scale).T).nan_to_num(0.0)
    per_epoch = []
    for s in snaps:
        W, shares = s["W"], s["loss_shares"]
        norms = W.norm(dim=0)
        unit = W / norms.clamp_min(1e-8)
        weight = shares if importance is None else importance
        length = weight / weight.max().clamp_min(1e-12)
        vectors = (unit * length).T  # [feature, 2], the drawn arrows, longest 1
        top = length.argsort(descending=True)[:2].tolist()
        per_epoch.append({
            "epoch": s["epoch"], "eval_loss": round(s["eval_loss"], 6),
            "n_long": int((length > LONG_ARROW).sum()),
            "long_features": torch.nonzero(length > LONG_ARROW).flatten().tolist(),
            "n_long_directions": direction_clusters(vectors, min_length=LONG_ARROW),
            "top2_features": top, "top2_lengths": [round(float(length[j]), 4) for j in top],
            "top2_angle_degrees": angle_degrees(vectors[top[0]], vectors[top[1]]),
            "main_directions_angle_degrees": main_directions_angle(vectors),
            "top2_activation_correlation": round(float(corr[top[0], top[1]]), 4),
            "n_represented": int((norms > REPRESENTED_NORM).sum()),
            # how many distinct directions the represented features (columns of W longer than 0.5) point in
            "n_represented_directions": direction_clusters(W.T, min_length=REPRESENTED_NORM),
            "n_share_above_10pct_of_max": int((length > 0.1).sum()),
            "n_directions": direction_clusters(vectors),
            "participation_ratio": round(float(1 / shares.pow(2).sum().clamp_min(1e-12)), 3),
            "feature_norms": [round(float(v), 4) for v in norms],
            "loss_shares": [round(float(v), 5) for v in shares],
            "arrows": [[round(float(x), 4), round(float(y), 4)] for x, y in vectors],
        })
    final = snaps[-1]["W"]
    rep = torch.nonzero(final.norm(dim=0) > REPRESENTED_NORM).flatten()
    cos = (final[:, rep] / final[:, rep].norm(dim=0)).T @ (final[:, rep] / final[:, rep].norm(dim=0)) if len(rep) else torch.zeros(0, 0)
    off = cos[~torch.eye(len(rep), dtype=torch.bool)] if len(rep) > 1 else torch.zeros(0)
    summary = {
        "sparsity": sparsity, "n_features": train_acts.shape[1], "n_live_features": int((train_acts.max(0).values > 0).sum()),
        "ae_input": c.ae_input, "independent_units_control": independent,
        "arrow_length": "loss share (unweighted loss)" if importance is None else "importance I_j (the loss weight)",
        "importance": None if importance is None else [round(float(v), 6) for v in importance],
        "final_n_long": per_epoch[-1]["n_long"],
        "final_n_long_directions": per_epoch[-1]["n_long_directions"],
        "final_top2_features": per_epoch[-1]["top2_features"],
        "final_top2_angle_degrees": per_epoch[-1]["top2_angle_degrees"],
        "top2_angle_degrees_by_epoch": [e["top2_angle_degrees"] for e in per_epoch],
        "final_main_directions_angle_degrees": per_epoch[-1]["main_directions_angle_degrees"],
        "final_top2_feature_norms": [per_epoch[-1]["feature_norms"][j] for j in per_epoch[-1]["top2_features"]],
        "final_top2_activation_correlation": per_epoch[-1]["top2_activation_correlation"],
        "final_n_represented": per_epoch[-1]["n_represented"],
        "final_n_represented_directions": per_epoch[-1]["n_represented_directions"],
        "final_n_directions": per_epoch[-1]["n_directions"],
        "final_participation_ratio": per_epoch[-1]["participation_ratio"],
        "final_represented_features": rep.tolist(),
        "final_max_abs_cosine_between_represented": round(float(off.abs().max()), 4) if len(off) else None,
        "per_epoch": per_epoch,
    }
    return summary, per_epoch


def directions_title(exp: int, sparsity: float, c: MnistConfig, weighted: bool, independent: bool) -> str:
    how = (f"loss weighted by {c.weighted_importance_base}<sup>rank</sup>, length = importance" if weighted
           else "unweighted loss, length = share of the loss")
    return (f"Exp{exp} (S={sparsity}): 49 hidden units in 2-D; {c.ae_input} activations, {how}"
            + ("; units shuffled (control)" if independent else ""))


def mean_activation_by_digit(acts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([acts[labels == d].mean(0) for d in range(10)])  # [digit, latent]


def key_features(normalised: torch.Tensor, min_k: int = 2, max_k: int = 5, mass: float = 0.5) -> list[int]:
    """The fewest top latents carrying ``mass`` of a digit's normalised activation, clamped to [min_k, max_k]."""
    values, order = normalised.sort(descending=True)
    k = int((values.cumsum(0) < mass).sum()) + 1
    return order[: max(min_k, min(max_k, k))].tolist()


def run_exp3(clf: MnistClassifier, data: MnistData, train_h: torch.Tensor, test_h: torch.Tensor, c: MnistConfig,
             progress: bool) -> tuple[dict, dict]:
    from saes.dictionary import DictionarySpec, build_dictionary, encode, reconstruct
    from saes.train import TrainConfig, train_dictionary

    # The L1 penalty is not scale-free: train on activations scaled to mean norm sqrt(d) and scale back after.
    d = train_h.shape[1]
    scale = float(d**0.5 / train_h.norm(dim=-1).mean())
    spec = DictionarySpec(kind="sae", layer=0, d_in=d, d_sae=c.sae_latents, d_out=d, hook_in="mnist.hidden", hook_out="mnist.hidden")
    sae = build_dictionary(spec, seed=c.seed)
    gen = torch.Generator().manual_seed(c.seed + 3)
    batches = (train_h[torch.randint(len(train_h), (c.sae_batch_size,), generator=gen)] * scale for _ in range(c.sae_steps))
    tcfg = TrainConfig(steps=c.sae_steps, lr=1e-3, l1_coefficient=c.sae_l1_coefficient, dead_after_tokens=50 * c.sae_batch_size,
                       resample_every=500, resample_until=0.5, seed=c.seed)
    history = train_dictionary(sae, batches, tcfg, progress=progress)

    with torch.no_grad():
        test_recon = reconstruct(sae, test_h * scale) / scale
        test_lat = encode(sae, test_h * scale)
        train_lat = encode(sae, train_h * scale)
    fvu = float((test_h - test_recon).pow(2).sum() / (test_h - test_h.mean(0)).pow(2).sum())
    clean_acc = accuracy(clf.logits_from_hidden(test_h), data.test_labels)
    sae_acc = accuracy(clf.logits_from_hidden(test_recon), data.test_labels)
    fired = (train_lat > 0).any(0) | (test_lat > 0).any(0)

    decoder = train_image_decoder(train_h, data.train_images, epochs=c.decoder_epochs, seed=c.seed, progress=progress)
    with torch.no_grad():
        decoder_acc = accuracy(clf(decoder(test_h)), data.test_labels)

    by_digit = mean_activation_by_digit(train_lat, data.train_labels)
    normalised = by_digit / by_digit.sum(-1, keepdim=True).clamp_min(1e-12)
    def generate(digit: int, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Only ``keys`` on, each at its mean activation where it fires on this digit; -> strengths, hidden, image."""
        on = train_lat[data.train_labels == digit][:, keys]
        strength = on.sum(0) / (on > 0).sum(0).clamp_min(1)
        lat = torch.zeros(c.sae_latents)
        lat[keys] = strength
        with torch.no_grad():
            hidden = (lat @ sae.W_dec + sae.b_dec) / scale
            return strength, hidden, decoder(hidden[None])[0]

    digits, images = [], []
    for digit in range(10):
        keys = key_features(normalised[digit])
        strength, hidden, image = generate(digit, keys)
        top2 = normalised[digit].topk(2).indices.tolist()
        with torch.no_grad():
            pred_image = int(clf(image[None]).argmax())
            pred_hidden = int(clf.logits_from_hidden(hidden[None]).argmax())
            pred_top2 = int(clf(generate(digit, top2)[2][None]).argmax())
        images.append(image.reshape(28, 28))
        digits.append({
            "digit": digit, "key_features": keys, "key_strengths": [round(float(v), 4) for v in strength],
            "key_shares": [round(float(normalised[digit, k]), 4) for k in keys],
            "percentile_90": round(float(normalised[digit].quantile(0.9)), 5),
            "predicted_from_image": pred_image, "predicted_from_hidden": pred_hidden,
            "predicted_from_image_top2_only": pred_top2,
        })
    summary = {
        "sae": {"d_sae": c.sae_latents, "activation_scale": scale, "train": asdict(tcfg),
                "explained_variance_test": round(1 - fvu, 4), "l0_test": round(float((test_lat > 0).float().sum(-1).mean()), 3),
                "dead_fraction": round(1 - float(fired.float().mean()), 4),
                "final_train_stats": history.to_json()[-1]},
        "accuracy_clean": round(clean_acc, 4),
        "accuracy_with_sae_reconstruction": round(sae_acc, 4),
        "accuracy_drop_points": round(100 * (clean_acc - sae_acc), 2),
        "accuracy_classifier_on_decoded_images": round(decoder_acc, 4),
        "key_feature_rule": "fewest top latents carrying 50% of the digit's normalised mean activation, clamped to 2..5",
        "digits": digits,
        "generated_read_as_intended_from_image": sum(r["predicted_from_image"] == r["digit"] for r in digits),
        "generated_read_as_intended_from_hidden": sum(r["predicted_from_hidden"] == r["digit"] for r in digits),
        "generated_read_as_intended_top2_only": sum(r["predicted_from_image_top2_only"] == r["digit"] for r in digits),
    }
    return summary, {"normalised": normalised, "images": torch.stack(images)}


def run_mnist(data: MnistData, c: MnistConfig, experiments: tuple[int, ...], out_dir: Path, progress: bool = True,
              png: bool = True) -> dict:
    from analysis import mnist_figures
    from analysis.figures_export import save_figure
    from saes.io import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"experiment": "superposition in an MNIST classifier", "data": data.source,
                     "config": asdict(c), "experiments_run": list(experiments), "torch_threads": torch.get_num_threads(),
                     "timings_s": {}, "figures": {}}
    t = time.time()
    clf = train_classifier(data.train_images, data.train_labels, epochs=c.classifier_epochs, seed=c.seed, progress=progress)
    with torch.no_grad():
        train_h, test_h = clf.hidden(data.train_images), clf.hidden(data.test_images)
        results["classifier"] = {"architecture": "784-49-10 ReLU", "epochs": c.classifier_epochs,
                                 "train_accuracy": round(accuracy(clf(data.train_images), data.train_labels), 4),
                                 "test_accuracy": round(accuracy(clf(data.test_images), data.test_labels), 4)}
    results["timings_s"]["classifier"] = round(time.time() - t, 1)
    figures = {}
    variants = [("", None, False)]
    if c.weighted_importance_base is not None:
        scale = feature_scale(train_h) if c.ae_input == "max_scaled" else 1.0
        importance = rank_importance(train_h / scale, c.weighted_importance_base)
        variants.append(("_weighted", importance, False))
        if c.independent_control:
            variants.append(("_weighted_independent", importance, True))
    for exp, sparsity in ((1, 0.0), (2, c.exp2_sparsity)):
        if exp not in experiments:
            continue
        for suffix, importance, independent in variants:
            if independent and exp != 1:
                continue  # the control is for the dense picture
            key = f"exp{exp}{suffix}"
            t = time.time()
            results[key], per_epoch = run_autoencoder_experiment(key, train_h, test_h, sparsity, c, progress, importance, independent)
            results["timings_s"][key] = round(time.time() - t, 1)
            figures[f"mnist_exp{exp}{suffix}_directions"] = mnist_figures.directions_by_epoch(
                per_epoch, directions_title(exp, sparsity, c, importance is not None, independent))
    if 3 in experiments:
        t = time.time()
        results["exp3"], arrays = run_exp3(clf, data, train_h, test_h, c, progress)
        results["timings_s"]["exp3"] = round(time.time() - t, 1)
        figures["mnist_exp3_histograms"] = mnist_figures.digit_histograms(arrays["normalised"], results["exp3"]["digits"])
        figures["mnist_exp3_generated"] = mnist_figures.generated_images(arrays["images"], results["exp3"]["digits"])
    for name, fig in figures.items():
        files = save_figure(fig, out_dir / name, png=png)
        results["figures"][name] = {"html": files.html.name, "png": files.png.name if files.png else None}
    atomic_write_json(out_dir / "results.json", results)
    return results
