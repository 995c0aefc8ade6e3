"""``circuits mnist``: superposition in an MNIST classifier (docs/experiments.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common import add_experiment_run_args


def register(subparsers) -> None:
    p = subparsers.add_parser("mnist", help="MNIST: Exp1 dense 2-D autoencoder, Exp2 sparse (superposition), Exp3 SAE features to images",
                              description=__doc__)
    p.add_argument("--mnist-dir", type=Path, default=None,
                   help="folder of the standard IDX .gz files; without it the full dataset is loaded through `datasets` (ylecun/mnist, needs the hub)")
    p.add_argument("--exp", choices=["1", "2", "3", "all"], default="all")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and the figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("--ae-epochs", type=int, default=20, help="epochs of the Exp1/Exp2 autoencoder (one figure panel each)")
    p.add_argument("--ae-repeats", type=int, default=64, help="passes over the training activations per autoencoder epoch")
    p.add_argument("--exp2-sparsity", type=float, default=0.999)
    p.add_argument("--sae-steps", type=int, default=6000)
    p.add_argument("--decoder-epochs", type=int, default=20)
    p.add_argument("--weighted-importance", type=float, default=0.7,
                   help="also run Exp1/Exp2 with the loss weighted by importance BASE**rank (0: skip)")
    p.add_argument("--ae-input", choices=["raw", "max_scaled"], default="raw",
                   help="Exp1/Exp2 autoencoder input: the raw hidden activations (as the original), or each unit divided by its maximum")
    p.add_argument("--no-independent-control", action="store_true",
                   help="skip the Exp1 control on unit-wise shuffled (independent) activations")
    add_experiment_run_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from analysis.mnist_data import load_mnist
    from analysis.mnist_experiments import MnistConfig, run_mnist

    torch.set_num_threads(args.threads)
    data = load_mnist(args.mnist_dir, seed=args.seed)
    experiments = (1, 2, 3) if args.exp == "all" else (int(args.exp),)
    cfg = MnistConfig(classifier_epochs=args.classifier_epochs, ae_epochs=args.ae_epochs, ae_repeats_per_epoch=args.ae_repeats,
                      exp2_sparsity=args.exp2_sparsity, sae_steps=args.sae_steps, decoder_epochs=args.decoder_epochs,
                      weighted_importance_base=args.weighted_importance or None, ae_input=args.ae_input,
                      independent_control=not args.no_independent_control, seed=args.seed)
    res = run_mnist(data, cfg, experiments, args.out, progress=not args.no_progress, png=not args.no_png)
    print(f"data: {res['data']['split']}")
    print(f"classifier test accuracy: {res['classifier']['test_accuracy']:.4f}")
    for exp in ("exp1", "exp2", "exp1_weighted", "exp2_weighted", "exp1_weighted_independent"):
        if exp in res:
            e = res[exp]
            print(f"{exp} (S={e['sparsity']}) after {len(e['per_epoch'])} epochs: {e['final_n_long']} long arrows (importance > 0.5 "
                  f"of the longest) in {e['final_n_long_directions']} directions, top two (units {e['final_top2_features']}) at "
                  f"{e['final_top2_angle_degrees']} deg, two main directions at {e['final_main_directions_angle_degrees']} deg; "
                  f"{e['final_n_represented']} of {e['n_live_features']} live features with |W_j| > 0.5 "
                  f"(in {e['final_n_represented_directions']} directions); "
                  f"participation ratio {e['final_participation_ratio']}")
    if "exp3" in res:
        e = res["exp3"]
        print(f"exp3 SAE: explained variance {e['sae']['explained_variance_test']}, L0 {e['sae']['l0_test']}, dead {e['sae']['dead_fraction']}; "
              f"accuracy clean {e['accuracy_clean']:.4f}, with SAE reconstruction {e['accuracy_with_sae_reconstruction']:.4f}")
        print(f"{'digit':>5}  {'key features':<26}read as")
        for r in e["digits"]:
            print(f"{r['digit']:>5}  {str(r['key_features']):<26}{r['predicted_from_image']}")
        print(f"generated images read as the intended digit: {e['generated_read_as_intended_from_image']}/10")
    print(f"wrote {args.out / 'results.json'}")
    return 0
