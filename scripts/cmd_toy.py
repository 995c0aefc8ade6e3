"""``circuits toy``: the Toy Models of Superposition experiments (docs/experiments.md); writes results.json and figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common import add_experiment_run_args


def register(subparsers) -> None:
    p = subparsers.add_parser("toy", help="toy models of superposition: n=5/m=2, n=20/m=5, dimensionality, SAE on toy",
                              description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and the figures")
    p.add_argument("--exp", nargs="+", choices=["five_two", "twenty_five", "dimensionality", "all"], default=["all"],
                   help="which experiments (five_two includes the SAE on its sparsest model); default all")
    p.add_argument("--steps", type=int, default=10_000, help="training steps of every toy model (paper: 10,000)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dim-features", type=int, default=200, help="n of the dimensionality sweep")
    p.add_argument("--dim-hidden", type=int, default=20, help="m of the dimensionality sweep")
    p.add_argument("--dim-instances", type=int, default=20, help="sparsities in the dimensionality sweep (notebook: 20)")
    p.add_argument("--dim-batch-size", type=int, default=1024, help="batch of the dimensionality sweep (paper: 1024)")
    p.add_argument("--dim-min-probability", type=float, default=0.05, help="sparsest 1 - S of the dimensionality sweep (from 1 down to this)")
    p.add_argument("--dim-init", choices=["per_instance", "notebook"], default="notebook",
                   help="init of the dimensionality sweep: Xavier per instance, or the notebook's Xavier over its joint [instance, n, m] tensor")
    p.add_argument("--replicas", type=int, default=4, help="inits per sparsity of the n=5, m=2 sweep (the lowest-loss one is kept)")
    p.add_argument("--twenty-five-replicas", type=int, default=4, help="inits per sparsity of the n=20, m=5 sweep (the lowest-loss one is kept)")
    p.add_argument("--twenty-five-eval-samples", type=int, default=2**19,
                   help="samples on which the n=20, m=5 replicas are compared (shared inputs, so differences are paired)")
    p.add_argument("--sae-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    add_experiment_run_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from analysis.toy_experiments import TOY_EXPERIMENTS, ToySuiteConfig, run_toy_suite

    torch.set_num_threads(args.threads)
    cfg = ToySuiteConfig(steps=args.steps, batch_size=args.batch_size, dim_features=args.dim_features,
                         dim_hidden=args.dim_hidden, dim_instances=args.dim_instances, dim_batch_size=args.dim_batch_size,
                         dim_min_probability=args.dim_min_probability, dim_init=args.dim_init,
                         five_two_replicas=args.replicas, twenty_five_replicas=args.twenty_five_replicas,
                         twenty_five_eval_samples=args.twenty_five_eval_samples, sae_steps=args.sae_steps, seed=args.seed)
    experiments = TOY_EXPERIMENTS if "all" in args.exp else tuple(e for e in TOY_EXPERIMENTS if e in args.exp)
    res = run_toy_suite(cfg, args.out, progress=not args.no_progress, png=not args.no_png, experiments=experiments)
    if "five_two" in res:
        f52, sae = res["five_two"]["checks"], res["sae_on_toy"]
        print(f"n=5 m=2   dense: {f52['dense_represented']} represented (norms {f52['dense_top2_norms']}, cos {f52['dense_top2_cosine']});"
              f" 1-S=0.05: {f52['sparse_represented']} represented, angular gaps {f52['sparse_angular_gaps_degrees']}")
        print(f"SAE on toy  best cosine per feature {sae['best_cosine_per_true_feature']}  (ReLU+L1: "
              f"{res['sae_on_toy_relu_l1']['best_cosine_per_true_feature']})")
    if "twenty_five" in res:
        f205 = res["twenty_five"]["checks"]
        print(f"n=20 m=5  dense max|W^T W - I_top5| = {f205['dense_WtW_max_abs_error_vs_top5_identity']}; represented by S: "
              + ", ".join(f"{s:.3g}:{n}" for s, n in f205["represented_by_sparsity"]))
        print("n=20 m=5  mean over replicas: " + ", ".join(f"{s:.3g}:{n}" for s, n in f205["represented_mean_over_replicas"])
              + f"; lowest-loss count monotone: {f205['lowest_loss_count_monotone']}")
    if "dimensionality" in res:
        dim = res["dimensionality"]["checks"]
        print("dimensionality  D* by S: " + ", ".join(f"{s:.3g}:{d:.3f}" for s, d in dim["D_star_by_sparsity"]))
        print(f"dimensionality  represented features near each fraction (|d - f| <= 0.03): {dim['fraction_counts_all']}")
        print("dimensionality  within 0.005 of each fraction (and of the points 0.0125 below / above): "
              + ", ".join(f"{k}: {v['at']} ({v['below']}/{v['above']})" for k, v in dim["fraction_lines_all"].items()))
    print(f"wrote {args.out / 'results.json'}")
    return 0
