"""Trial of other settings for one dictionary of the mini suite: train it, then score it as the suite is scored.

    python -m scripts.try_dictionary --site mlp0 --d-sae 4096 --activation topk --k 32 --steps 600 --out runs/try/mlp0

The question it answers: would a dictionary trained differently (wider, another k, ReLU + L1) give the suite
better detectors without losing its quality floors? It is how the detector search of ``docs/dashboards.md``
was tried beyond the shipped suite.

1. Training rows: ``--tokens`` (the ``tokens.safetensors`` that ``scripts/build_mini.py`` writes in its work
   folder) or, without it, the training files of the corpus tokenised the same way.
2. Train the one dictionary with the recipe's loop (``saes.mini_recipe.train_suite_dictionaries``: same batch
   stream, same seeding by the dictionary's place in the suite, resumable in ``--out``).
3. Score it in place of the shipped one: L0, explained variance, dead fraction and CE loss recovered on the
   held-out rows (``saes.metrics``), and the best features for each token class of the detector search
   (``analysis.detectors.rank_features`` over the held-out token set).
4. Print a table and write ``OUT/report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

SITES = "attn0 .. attnN, mlp0 .. mlpN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.try_dictionary", description=__doc__.split("\n\n")[1])
    p.add_argument("--site", required=True, help=f"which dictionary of the suite to replace ({SITES})")
    p.add_argument("--d-sae", type=int, default=None, help="number of features (default: the recipe's)")
    p.add_argument("--activation", choices=["topk", "jumprelu", "relu"], default="topk",
                   help="jumprelu: trained as BatchTopK (mean L0 --k), used with its learned threshold")
    p.add_argument("--k", type=int, default=None, help="TopK's k, or BatchTopK's mean L0 (default: the recipe's for this site)")
    p.add_argument("--l1", type=float, default=None, help="L1 coefficient for --activation relu")
    p.add_argument("--l0", type=float, default=None,
                   help="with --activation jumprelu: train it directly with this L0 coefficient and learned per-latent "
                        "thresholds (Rajamanoharan et al. 2024) instead of as BatchTopK (without --k)")
    p.add_argument("--bandwidth", type=float, default=None, help="with --l0: the straight-through kernel's width")
    p.add_argument("--init-threshold", type=float, default=None, help="with --l0: the thresholds' starting value")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's for this site)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--resample-every", type=int, default=None,
                   help="re-initialise dead latents every N steps (up to --resample-until of training; default: never)")
    p.add_argument("--resample-until", type=float, default=None, help="fraction of training with resampling (default 0.6)")
    p.add_argument("--matryoshka", default=None,
                   help="comma-separated Matryoshka prefix sizes, e.g. 128,512 (TopK and BatchTopK; default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="initialisation and resampling seed (default: the recipe's, 0; the batch stream stays the recipe's)")
    p.add_argument("--suite-dir", type=Path, default=None, help="the suite folder (default: the shipped saes/mini)")
    p.add_argument("--tokens", type=Path, default=None, help="tokens.safetensors from a build_mini work folder")
    p.add_argument("--classes", nargs="*", default=[".", "for", "import"], help="token classes to search")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", type=Path, required=True, help="folder for the dictionary and report.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def trial_spec(model, args: argparse.Namespace):
    """The recipe's spec and training config for ``args.site``, with the given settings replaced."""
    from saes import mini_recipe as recipe

    specs = recipe.suite_specs(model)
    if args.site not in specs:
        raise ValueError(f"unknown site {args.site!r}; this suite has {', '.join(specs)}")
    spec = specs[args.site]
    changes: dict = {"activation": args.activation}
    if args.d_sae is not None:
        if args.d_sae <= 0:
            raise ValueError(f"--d-sae must be positive, got {args.d_sae}")
        changes["d_sae"] = args.d_sae
    direct = args.activation == "jumprelu" and args.l0 is not None
    if args.l0 is not None and args.activation != "jumprelu":
        raise ValueError("--l0 trains a JumpReLU dictionary directly; give it with --activation jumprelu")
    if direct and args.k is not None:
        raise ValueError("--k sets a TopK or BatchTopK target; with --l0 the L0 follows from the coefficient, so drop --k")
    if (args.bandwidth is not None or args.init_threshold is not None) and args.l0 is None:
        raise ValueError("--bandwidth and --init-threshold only apply to JumpReLU trained directly (--l0)")
    if args.activation in ("topk", "jumprelu") and not direct:
        changes["k"] = args.k if args.k is not None else (spec.k or recipe.K)
    else:
        changes["k"] = None
    spec = dataclasses.replace(spec, **changes)
    cfg = recipe.train_config(args.site)
    over: dict = {}
    if args.steps is not None:
        over["steps"] = args.steps
    if args.lr is not None:
        over["lr"] = args.lr
    if args.resample_every is not None:
        over["resample_every"] = args.resample_every
    if args.resample_until is not None:
        over["resample_until"] = args.resample_until
    if args.seed is not None:
        over["seed"] = args.seed
    if args.matryoshka:
        try:
            over["matryoshka"] = tuple(int(m) for m in args.matryoshka.split(","))
        except ValueError:
            raise ValueError(f"--matryoshka takes comma-separated integers such as 128,512, got {args.matryoshka!r}") from None
        if over["matryoshka"][-1] >= spec.d_sae:
            raise ValueError(f"--matryoshka prefixes must be below --d-sae ({spec.d_sae}), got {args.matryoshka}")
    if direct:
        over.update(l0_coefficient=args.l0, aux_k=None)
        if args.bandwidth is not None:
            over["jumprelu_bandwidth"] = args.bandwidth
        if args.init_threshold is not None:
            over["jumprelu_init_threshold"] = args.init_threshold
    if args.activation == "relu":
        if args.l1 is None:
            raise ValueError("--activation relu needs --l1 (the L1 coefficient, e.g. 3e-3)")
        over.update(l1_coefficient=args.l1, aux_k=None)
    return spec, dataclasses.replace(cfg, **over)


def training_rows(model, tokens: Path | None):
    from saes.corpus import rows_from_stream, split_files, token_stream
    from saes.io import read_tensors
    from saes.tokenizer import EOT

    if tokens is not None:
        return read_tensors(tokens)["train"]
    tokenizer = model.tokenizer
    eot = tokenizer.convert_tokens_to_ids(EOT)
    train, _ = split_files()
    return rows_from_stream(token_stream(tokenizer._tokenizer, train, eot), model.cfg.n_ctx, eot)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from analysis.detectors import rank_features
    from analysis.scorecard import heldout_token_set, parse_token_class
    from saes import mini_recipe as recipe
    from saes.io import atomic_write_json, load_dictionary
    from saes.metrics import evaluate_dictionaries
    from saes.mini_suite import heldout_rows
    from saes.suite import Suite, load_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite("mini", path=args.suite_dir)
    spec, cfg = trial_spec(suite.model, args)
    classes = [parse_token_class(c) for c in args.classes]
    # 1-2. train (resumable: a finished dictionary in --out is reused)
    rows = training_rows(suite.model, args.tokens)
    recipe.train_suite_dictionaries(suite.model, rows, args.out, progress=not args.no_progress,
                                    specs={args.site: spec}, configs={args.site: cfg})
    sae = load_dictionary(args.out / args.site)
    # 3. score it alone, in place of the shipped one
    alone = Suite(name=suite.name, model=suite.model, info={},
                  attn_saes={spec.layer: sae} if spec.kind == "attn_sae" else {},
                  transcoders={spec.layer: sae} if spec.kind == "transcoder" else {})
    metrics = evaluate_dictionaries(alone, heldout_rows(suite), ce_rows=128, progress=not args.no_progress)[0].to_json()
    ranking = rank_features(alone, classes, heldout_token_set(suite.model), top=3)
    report = dict(site=args.site, spec=dataclasses.asdict(spec), train=dataclasses.asdict(cfg), metrics=metrics,
                  detectors={k: [dataclasses.asdict(c) for c in v] for k, v in ranking.items()})
    atomic_write_json(args.out / "report.json", report)
    # 4. the table
    print(f"{args.site}: {spec.activation} d_sae={spec.d_sae} k={spec.k} steps={cfg.steps}  "
          f"L0 {metrics['l0']:.1f}  EV {metrics['explained_variance']:.3f}  dead {metrics['dead_fraction']:.3f}  "
          f"CE recovered {metrics['ce_loss_recovered']:.3f}")
    for name, cands in ranking.items():
        best = cands[0]
        print(f"  {name:10s} best #{best.feature:<5d} specificity {best.specificity:.3f}  sensitivity {best.sensitivity:.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"try_dictionary: error: {e}", file=sys.stderr)
        sys.exit(2)
