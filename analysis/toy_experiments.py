"""The Toy Models of Superposition experiments (Elhage et al. 2022), each returning JSON-ready numbers and its weights.

1. ``five_two``: n=5, m=2, importance 0.9^i, feature probability 1 - S from 1 down to 0.05. Dense: the two most
   important features, orthogonal, the rest dropped; sparse: all five, in a pentagon.
2. ``twenty_five``: n=20, m=5, importance 0.7^i, S from 0 to 0.999. Dense: W^T W is the identity on the top 5;
   the number of represented features grows with sparsity, the least important going into superposition
   first, in antipodal pairs.
3. ``dimensionality``: n=200, m=20, uniform importance, 20 sparsities with 1 - S log-spaced from 1 to 0.05, batch
   1024, 10,000 steps, W initialised as the notebook does (its "feature geometry" cells): D* = m / ||W||_F^2 and
   each feature's dimensionality, which stick at 1, 1/2 and other simple fractions.
4. ``sae_on_toy``: an SAE trained with ``saes.train`` on the hidden activations ``h = W x`` of the sparsest
   n=5, m=2 model; its decoder rows should find the five feature directions (best cosine > 0.9 each). The default
   is TopK with k=1: in a 2-D space a ReLU latent fires on a half-plane, i.e. on two or three of the five
   pentagon directions at once, so a ReLU + L1 SAE lands between features (it is run too, for comparison).
Every n=5, m=2 and n=20, m=5 sparsity is trained from several initialisations at once and the lowest-loss one is
kept: a small model sometimes settles in a local minimum (four features in a square instead of the pentagon; at
high sparsity a few features fewer than another initialisation reaches).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import torch

from analysis.superposition import REPRESENTED_NORM, angular_gaps_2d, fraction_counts, fraction_lines, summarize_instance
from analysis.toy_models import (ToyConfig, ToyModel, evaluate_loss, geometric_importance, paired_chunk_losses,
                                 probability_sweep, sample_features, train_toy_model)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToySuiteConfig:
    """The sizes of every toy experiment. Defaults run in a few minutes on 2 CPU cores."""

    steps: int = 10_000
    batch_size: int = 1024
    five_two_instances: int = 10
    five_two_replicas: int = 4  # inits per sparsity; the lowest-loss one is kept (small models hit local minima)
    twenty_five_instances: int = 20
    twenty_five_replicas: int = 4  # inits per sparsity, lowest loss kept: single runs stop at uneven counts when sparse
    twenty_five_min_probability: float = 0.001
    # The replicas of one sparsity are compared on shared inputs (toy_models.paired_chunk_losses), this many samples.
    twenty_five_eval_samples: int = 2**19
    dim_features: int = 200
    dim_hidden: int = 20
    dim_instances: int = 20  # the notebook's "feature geometry" cell: 20 sparsities, 1-S = 20^-linspace(0, 1, 20)
    dim_min_probability: float = 0.05
    dim_batch_size: int = 1024
    dim_init: str = "notebook"  # the notebook's Xavier init over its joint tensor (analysis.toy_models.ToyConfig.init)
    sae_latents: int = 10
    sae_k: int | None = 1  # TopK with k=1 (None: ReLU + L1). The module docstring says why.
    sae_steps: int = 3000
    sae_l1_coefficient: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.five_two_instances, self.twenty_five_instances, self.dim_instances,
               self.dim_batch_size, self.sae_latents, self.sae_steps, self.five_two_replicas, self.twenty_five_replicas) <= 0:
            raise ValueError("every step count, batch size, instance count and width must be positive")
        if self.sae_latents < 5:
            raise ValueError(f"the SAE must have at least 5 latents to recover 5 features, got {self.sae_latents}")


def five_two_config(c: ToySuiteConfig) -> ToyConfig:
    sweep = probability_sweep(c.five_two_instances, 0.05)
    return ToyConfig(5, 2, tuple(p for p in sweep for _ in range(c.five_two_replicas)), geometric_importance(5, 0.9),
                     steps=c.steps, batch_size=c.batch_size, seed=c.seed)


def twenty_five_config(c: ToySuiteConfig, replicas: int | None = None) -> ToyConfig:
    """The n=20, m=5 sweep, each sparsity ``replicas`` times (default ``c.twenty_five_replicas``; the benchmark uses 1)."""
    r = c.twenty_five_replicas if replicas is None else replicas
    sweep = probability_sweep(c.twenty_five_instances, c.twenty_five_min_probability)
    return ToyConfig(20, 5, tuple(p for p in sweep for _ in range(r)), geometric_importance(20, 0.7),
                     steps=c.steps, batch_size=c.batch_size, seed=c.seed)


def dimensionality_config(c: ToySuiteConfig) -> ToyConfig:
    return ToyConfig(c.dim_features, c.dim_hidden, probability_sweep(c.dim_instances, c.dim_min_probability),
                     (1.0,) * c.dim_features, steps=c.steps, batch_size=c.dim_batch_size, seed=c.seed, init=c.dim_init)


def best_replicas(cfg: ToyConfig, losses: list[float]) -> list[int]:
    """Index of the lowest-loss instance for each distinct feature probability, in sweep order."""
    best: dict[float, int] = {}
    for i, p in enumerate(cfg.feature_probability):
        if p not in best or losses[i] < losses[best[p]]:
            best[p] = i
    return list(best.values())


def per_instance(cfg: ToyConfig, model: ToyModel, eval_loss: list[float], keep: list[int],
                 chunk_losses: torch.Tensor | None = None) -> list[dict]:
    """One row per sparsity (its kept replica). With ``chunk_losses`` (paired evaluation), each replica's loss
    difference from the kept one and the standard error of that difference, relative to the kept loss."""
    rows = []
    for i in keep:
        p = cfg.feature_probability[i]
        same = [j for j, q in enumerate(cfg.feature_probability) if q == p]
        row = {"sparsity": round(1 - p, 6), "feature_probability": round(p, 6), "eval_loss": float(f"{eval_loss[i]:.6g}"),
               "replica_losses": [float(f"{eval_loss[j]:.6g}") for j in same],
               "replica_n_represented": [int((model.W[j].norm(dim=0) > REPRESENTED_NORM).sum()) for j in same]}
        if chunk_losses is not None:
            diff = chunk_losses[:, same] - chunk_losses[:, [i]]  # [chunk, replica], paired
            se = diff.std(0) / len(diff) ** 0.5
            row["replica_excess_loss_relative"] = [round(float(d / eval_loss[i]), 6) for d in diff.mean(0)]
            row["replica_excess_loss_se_relative"] = [round(float(e / eval_loss[i]), 6) for e in se]
            others = [k for k, j in enumerate(same) if j != i]
            # The kept replica is clearly the best when every other one is worse by more than 2 standard errors.
            row["kept_replica_clearly_best"] = all(float(diff[:, k].mean()) > 2 * float(se[k]) for k in others)
        row.update(summarize_instance(model.W[i]))
        rows.append(row)
    return rows


def train_and_summarize(cfg: ToyConfig, progress: bool, desc: str, paired_eval_samples: int | None = None
                        ) -> tuple[list[dict], torch.Tensor]:
    """Train the batch, keep the best replica per sparsity; returns the rows and their ``W: [sparsity, m, n]``.
    ``paired_eval_samples``: compare replicas on shared inputs (``paired_chunk_losses``) instead of independent ones."""
    run = train_toy_model(cfg, progress=progress, desc=desc)
    chunks = None
    if paired_eval_samples:
        chunks = paired_chunk_losses(run.model, paired_eval_samples)
        losses = chunks.mean(0).tolist()
    else:
        losses = evaluate_loss(run.model)
    keep = best_replicas(cfg, losses)
    return per_instance(cfg, run.model, losses, keep, chunks), run.model.W[keep].clone()


def run_five_two(c: ToySuiteConfig, progress: bool = True) -> tuple[dict, torch.Tensor]:
    cfg = five_two_config(c)
    rows, W = train_and_summarize(cfg, progress, "toy n=5 m=2")
    for row, w in zip(rows, W):
        row["angular_gaps_degrees"] = angular_gaps_2d(w)
        row["WtW"] = [[round(float(v), 4) for v in r] for r in w.T @ w]
    dense, sparse = rows[0], rows[-1]
    checks = {
        "dense_represented": dense["n_represented"],
        "dense_top2_norms": dense["feature_norms"][:2],
        "dense_top2_cosine": round(float(torch.nn.functional.cosine_similarity(W[0][:, 0], W[0][:, 1], dim=0)), 4),
        "dense_rest_max_norm": max(dense["feature_norms"][2:]),
        "sparse_represented": sparse["n_represented"],
        "sparse_angular_gaps_degrees": sparse["angular_gaps_degrees"],
    }
    return {"config": cfg.to_json(), "instances": rows, "checks": checks}, W


def run_twenty_five(c: ToySuiteConfig, progress: bool = True) -> tuple[dict, torch.Tensor]:
    cfg = twenty_five_config(c)
    rows, W = train_and_summarize(cfg, progress, "toy n=20 m=5", paired_eval_samples=c.twenty_five_eval_samples)
    wtw = W[0].T @ W[0]
    target = torch.zeros_like(wtw)
    target[:5, :5] = torch.eye(5)
    # Which features are in superposition: represented (norm > 0.5) and sharing their direction (interference > 0.1).
    for row in rows:
        row["in_superposition"] = [j for j, (n, s) in enumerate(zip(row["feature_norms"], row["superposition"])) if n > 0.5 and s > 0.1]
    first = next((r for r in rows if r["in_superposition"]), None)
    checks = {
        "dense_WtW_max_abs_error_vs_top5_identity": round(float((wtw - target).abs().max()), 4),
        "represented_by_sparsity": [(r["sparsity"], r["n_represented"]) for r in rows],
        "represented_by_sparsity_every_replica": [(r["sparsity"], r["replica_n_represented"]) for r in rows],
        "represented_mean_over_replicas": [(r["sparsity"], round(sum(r["replica_n_represented"]) / len(r["replica_n_represented"]), 3)) for r in rows],
        "lowest_loss_count_monotone": all(a["n_represented"] <= b["n_represented"] for a, b in zip(rows, rows[1:])),
        "kept_replica_clearly_best": [(r["sparsity"], r["kept_replica_clearly_best"]) for r in rows],
        "first_superposed_sparsity": first["sparsity"] if first else None,
        "first_superposed_features": first["in_superposition"] if first else [],
        "antipodal_pairs_at_first_superposition": first["antipodal_pairs"] if first else [],
    }
    return {"config": cfg.to_json(), "instances": rows, "checks": checks}, W


def run_dimensionality(c: ToySuiteConfig, progress: bool = True) -> tuple[dict, torch.Tensor]:
    cfg = dimensionality_config(c)
    rows, W = train_and_summarize(cfg, progress, f"toy n={cfg.n_features} m={cfg.n_hidden}")
    all_dims, all_dims_rep = [], []
    for row in rows:
        dims = [d for d, n in zip(row["feature_dimensionality"], row["feature_norms"]) if n > 0.5]
        row["fraction_counts"] = fraction_counts(dims)
        row["fraction_counts_within_0.01"] = fraction_counts(dims, tolerance=0.01)
        all_dims += dims
        all_dims_rep += [d for d in row["feature_dimensionality_represented"] if d is not None]
    checks = {
        "D_star_by_sparsity": [(r["sparsity"], r["dimensions_per_feature"]) for r in rows],
        "fraction_counts_all": fraction_counts(all_dims),
        "fraction_counts_all_within_0.01": fraction_counts(all_dims, tolerance=0.01),
        # at: within 0.005 of the fraction; below/above: within 0.005 of the points 0.0125 either side of it
        "fraction_lines_all": fraction_lines(all_dims),
        "n_represented_features_all": len(all_dims),
        # the same with D_i summed over the represented features only (superposition.feature_dimensionality_represented)
        "fraction_counts_represented_only": fraction_counts(all_dims_rep),
        "fraction_lines_represented_only": fraction_lines(all_dims_rep),
    }
    return {"config": cfg.to_json(), "instances": rows, "checks": checks}, W


def hidden_activations(W: torch.Tensor, feature_probability: float, n_samples: int, seed: int) -> torch.Tensor:
    """``h = W x`` for ``n_samples`` inputs, each feature present with ``feature_probability``, uniform in [0, 1]."""
    m, n = W.shape
    cfg = ToyConfig(n, m, (feature_probability,), (1.0,) * n)
    x = sample_features(cfg, n_samples, torch.Generator().manual_seed(seed))[0]
    return x @ W.T


def best_cosines(true_directions: torch.Tensor, decoder: torch.Tensor) -> tuple[list[float], list[int]]:
    """For each true direction (a column of ``[d, n]``), the best cosine with any decoder row (``[d_sae, d]``)."""
    t = true_directions / true_directions.norm(dim=0, keepdim=True).clamp_min(1e-8)
    d = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = t.T @ d.T
    best, idx = cos.max(dim=-1)
    return [round(float(v), 4) for v in best], [int(i) for i in idx]


def run_sae_on_toy(c: ToySuiteConfig, W: torch.Tensor, feature_probability: float, progress: bool = True):
    """Train an SAE (``saes/`` trainer, ReLU + L1, dead-latent resampling) on ``h = W x`` of one toy model."""
    from saes.dictionary import DictionarySpec, build_dictionary, encode, reconstruct
    from saes.train import TrainConfig, train_dictionary

    m = W.shape[0]
    spec = DictionarySpec(kind="sae", layer=0, d_in=m, d_sae=c.sae_latents, d_out=m, hook_in="toy.hidden", hook_out="toy.hidden",
                          activation="topk" if c.sae_k else "relu", k=c.sae_k)
    sae = build_dictionary(spec, seed=c.seed)
    batch = c.batch_size
    data = hidden_activations(W, feature_probability, c.sae_steps * batch, seed=c.seed + 7).split(batch)
    tcfg = TrainConfig(steps=c.sae_steps, lr=3e-3, warmup_steps=100, l1_coefficient=c.sae_l1_coefficient,
                       dead_after_tokens=20 * batch, aux_k=c.sae_latents // 2 or 1, resample_every=250, resample_until=0.6, seed=c.seed)
    history = train_dictionary(sae, data, tcfg, progress=progress)
    best, idx = best_cosines(W, sae.W_dec.detach())
    test = hidden_activations(W, feature_probability, 20_000, seed=c.seed + 8)
    with torch.no_grad():
        recon = reconstruct(sae, test)
        acts = encode(sae, test)
    fvu = float((test - recon).pow(2).sum() / (test - test.mean(0)).pow(2).sum())
    result = {
        "toy_model_sparsity": round(1 - feature_probability, 6),
        "d_sae": c.sae_latents,
        "train": asdict(tcfg),
        "best_cosine_per_true_feature": best,
        "best_latent_per_true_feature": idx,
        "all_recovered_above_0.9": all(v > 0.9 for v in best),
        "explained_variance": round(1 - fvu, 4),
        "l0": round(float((acts > 0).float().sum(-1).mean()), 4),
        "final_train_stats": history.to_json()[-1],
    }
    return result, sae


PAPER_SPARSITIES = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)  # the panels of the paper's n=20, m=5 figure


def nearest_indices(values: list[float], targets: tuple[float, ...]) -> list[int]:
    return sorted({min(range(len(values)), key=lambda i: abs(values[i] - t)) for t in targets})


TOY_EXPERIMENTS = ("five_two", "twenty_five", "dimensionality")  # five_two includes the SAE on its sparsest model


def run_toy_suite(c: ToySuiteConfig, out_dir, progress: bool = True, png: bool = True,
                  experiments: tuple[str, ...] = TOY_EXPERIMENTS) -> dict:
    """Run the toy experiments (default all), write ``out_dir/results.json`` and the figures; returns the results."""
    unknown = set(experiments) - set(TOY_EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown toy experiments {sorted(unknown)}; choose from {TOY_EXPERIMENTS}")
    import time
    from pathlib import Path

    from analysis import toy_figures
    from analysis.figures_export import save_figure
    from saes.io import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"experiment": "toy models of superposition (Elhage et al. 2022)", "config": asdict(c),
                     "experiments_run": list(experiments), "torch_threads": torch.get_num_threads(), "timings_s": {}, "figures": {}}
    figures = {}
    if "five_two" in experiments:
        run_five_two_and_sae(c, results, figures, progress)
    if "twenty_five" in experiments:
        run_twenty_five_and_figures(c, results, figures, progress)
    if "dimensionality" in experiments:
        t = time.time()
        results["dimensionality"], _ = run_dimensionality(c, progress)
        results["timings_s"]["dimensionality"] = round(time.time() - t, 1)
        figures["toy_dimensionality"] = toy_figures.dimensionality_scatter(
            results["dimensionality"]["instances"], f"Feature dimensionality, n={c.dim_features}, m={c.dim_hidden}, uniform importance")

    for name, fig in figures.items():
        files = save_figure(fig, out_dir / name, png=png)
        results["figures"][name] = {"html": files.html.name, "png": files.png.name if files.png else None}
    atomic_write_json(out_dir / "results.json", results)
    return results


def run_five_two_and_sae(c: ToySuiteConfig, results: dict, figures: dict, progress: bool) -> None:
    import time

    from analysis import toy_figures

    t = time.time()
    results["five_two"], W52 = run_five_two(c, progress)
    results["timings_s"]["five_two"] = round(time.time() - t, 1)
    s52 = [r["sparsity"] for r in results["five_two"]["instances"]]
    figures["toy_five_two_arrangements"] = toy_figures.arrangements_2d(
        W52, s52, list(geometric_importance(5, 0.9)), "n=5, m=2, importance 0.9^i: columns of W by feature probability 1-S")

    t = time.time()
    results["sae_on_toy"], sae = run_sae_on_toy(c, W52[-1], 1 - s52[-1], progress)
    relu_cfg = replace(c, sae_k=None)
    results["sae_on_toy_relu_l1"], _ = run_sae_on_toy(relu_cfg, W52[-1], 1 - s52[-1], progress)
    results["timings_s"]["sae_on_toy"] = round(time.time() - t, 1)
    figures["toy_sae_directions"] = toy_figures.sae_directions(
        W52[-1], sae.W_dec.detach(), results["sae_on_toy"]["best_cosine_per_true_feature"],
        f"TopK(k={c.sae_k}) SAE with {c.sae_latents} latents on the hidden layer of the n=5, m=2 model at S={s52[-1]:.3g}")


def run_twenty_five_and_figures(c: ToySuiteConfig, results: dict, figures: dict, progress: bool) -> None:
    import time

    from analysis import toy_figures

    t = time.time()
    results["twenty_five"], W205 = run_twenty_five(c, progress)
    results["timings_s"]["twenty_five"] = round(time.time() - t, 1)
    s205 = [r["sparsity"] for r in results["twenty_five"]["instances"]]
    pick = nearest_indices(s205, PAPER_SPARSITIES)
    figures["toy_twenty_five_wtw"] = toy_figures.wtw_heatmaps(W205[pick], [s205[i] for i in pick], "n=20, m=5, importance 0.7^i: W<sup>T</sup>W")
    figures["toy_twenty_five_norms"] = toy_figures.norms_by_superposition(
        W205[pick], [s205[i] for i in pick], "n=20, m=5: feature norms ||W<sub>i</sub>|| (feature 0 on top), colour = superposition")
