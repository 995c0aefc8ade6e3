"""``circuits probe``: how well a linear probe reads a token class at each dictionary input of a suite.

    circuits probe --model mini --token . --out DIR [--hooks HOOK ...] [--n-tokens N]

The reference for the detector search (``analysis/probes.py``): the probe is scored as a feature, with the
scorecard's specificity and sensitivity, on a held-out half of the tokens. For a class narrowed by what follows
(the full stop), also the model's own next-token prediction scored the same way, over all the tokens. Writes
``DIR/probes.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from scripts.common import add_model_args, load_suite_from_args, write_json


def register(sub) -> None:
    p = sub.add_parser("probe", help="linear probe of a token class at each dictionary input: the reference for detectors")
    add_model_args(p)
    p.add_argument("--token", default=".", help="token class by stripped text ('.' is the sentence-ending full stop)")
    p.add_argument("--hooks", nargs="*", default=None,
                   help="TransformerLens hook names (default: every dictionary's input hook, in suite order)")
    p.add_argument("--n-tokens", type=int, default=None, help="held-out tokens (default: all held-out files)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(handler=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    if args.n_tokens is not None and args.n_tokens <= 0:
        raise ValueError(f"--n-tokens must be positive, got {args.n_tokens}")
    from analysis.probes import ProbeConfig, model_prediction_reference, probe_hooks
    from analysis.scorecard import heldout_token_set, parse_token_class
    from saes.dictionary import spec_of

    token_class = parse_token_class(args.token)
    suite = load_suite_from_args(args)
    hooks = args.hooks or list(dict.fromkeys(spec_of(s).hook_in for s in suite.dictionaries().values()))
    tokens = heldout_token_set(suite.model, args.n_tokens)
    cfg = ProbeConfig()
    results = probe_hooks(suite.model, token_class, hooks, tokens, cfg)
    prediction = (model_prediction_reference(suite.model, token_class, tokens, batch_rows=cfg.batch_rows)
                  if token_class.followed_by is not None else None)
    write_json(args.out / "probes.json", {"token_class": token_class.to_json(), "config": dataclasses.asdict(cfg),
                                          "n_tokens": tokens.n_tokens, "probes": [r.to_json() for r in results],
                                          "model_prediction": prediction})
    print(f"{'hook':<32} {'accuracy':>8}  best shift  {'spec':>6} {'sens':>6}")
    for r in results:
        b = r.best
        print(f"{r.hook:<32} {r.accuracy:>8.3f}  {b['shift']:>10.1f}  {b['specificity']:>6.3f} {b['sensitivity']:>6.3f}")
    if prediction is not None:
        b, label = prediction["best"], "model's next-token prediction"
        print(f"{label:<32} {prediction['accuracy_at_0.5']:>8.3f}  "
              f"above {b['threshold']:>4.1f}  {b['specificity']:>6.3f} {b['sensitivity']:>6.3f}")
    print(f"wrote {args.out / 'probes.json'}")
    return 0
