"""``circuits dashboard`` and ``circuits detectors``: feature dashboards with scorecards, and detector search.

    circuits dashboard --model mini --dictionary mlp0 --features 3,17 --out DIR [--token import] [--prompt TEXT]
    circuits detectors --model mini [--tokens . for import] --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common import add_model_args, load_suite_from_args, write_json


def parse_features(text: str) -> list[int]:
    try:
        feats = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ValueError(f"--features {text!r}: give comma-separated feature indices such as --features 3,17") from None
    if not feats:
        raise ValueError("--features is empty; give comma-separated feature indices such as --features 3,17")
    return feats


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="feature dashboards (sae-vis, offline) with a scorecard beside each")
    add_model_args(p)
    p.add_argument("--dictionary", required=True, help="dictionary name: attn0, mlp0, attn1, ...")
    p.add_argument("--features", required=True, help="comma-separated feature indices, e.g. 3,17")
    p.add_argument("--token", default=None,
                   help="token class the features are claimed to detect ('.' is the sentence-ending full stop); "
                        "default: each feature's top token by activation")
    p.add_argument("--prompt", action="append", default=[], help="also write a prompt-centric page for this prompt (repeatable)")
    p.add_argument("--n-tokens", type=int, default=50_000, help="held-out tokens for examples and scorecards (default 50000)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(handler=run_dashboard)

    q = sub.add_parser("detectors", help="find the best detector feature for each token class; pages and detectors.json")
    add_model_args(q)
    q.add_argument("--tokens", nargs="*", default=[".", "for", "import"],
                   help="token classes by stripped text ('.' is the sentence-ending full stop); default: . for import")
    q.add_argument("--n-tokens", type=int, default=None, help="held-out tokens to search (default: all held-out files)")
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument("--progress", action="store_true", help="show progress bars")
    q.set_defaults(handler=run_detectors)


def _check_n_tokens(n: int | None) -> None:
    if n is not None and n <= 0:
        raise ValueError(f"--n-tokens must be positive, got {n}")


def run_dashboard(args: argparse.Namespace) -> int:
    features = parse_features(args.features)
    _check_n_tokens(args.n_tokens)
    from analysis.dashboards import _write_dashboards, check_dashboard_dictionaries, write_prompt_dashboard
    from analysis.scorecard import check_features, heldout_token_set, parse_token_class

    claim = parse_token_class(args.token) if args.token is not None else None
    suite = load_suite_from_args(args)
    check_dashboard_dictionaries(suite, [args.dictionary])
    check_features(suite.dictionary(args.dictionary), args.dictionary, features)
    tokens = heldout_token_set(suite.model, args.n_tokens)
    claims = {(args.dictionary, f): claim for f in features} if claim else None
    pages, cards = _write_dashboards(suite, {args.dictionary: features}, args.out, tokens, None, claims, args.progress)
    prompts = []
    for i, prompt in enumerate(args.prompt):
        path = write_prompt_dashboard(suite, args.dictionary, prompt, args.out / f"prompt_{i}.html", tokens=tokens, progress=args.progress)
        prompts.append({"prompt": prompt, "page": path.name})
    summary = [dict(cards[k], dashboard=v) for k, v in pages.items()]
    write_json(args.out / "dashboards.json", {"dashboards": summary, "prompt_pages": prompts})
    print(f"{'dictionary':<10} {'feature':>7} {'class':<10} {'spec':>6} {'sens':>6} {'|corr|':>6}  page")
    for c in summary:
        print(f"{c['dictionary']:<10} {c['feature']:>7} {c['token_class'][:10]:<10} {c['specificity']:>6.3f} "
              f"{c['sensitivity']:>6.3f} {c['max_neuron_corr']:>6.3f}  {args.out / c['dashboard']}")
    for p in prompts:
        print(f"prompt page: {args.out / p['page']}")
    return 0


def run_detectors(args: argparse.Namespace) -> int:
    if not args.tokens:
        raise ValueError("--tokens was given no token classes; name at least one, e.g. --tokens . for import")
    _check_n_tokens(args.n_tokens)
    from analysis.detectors import FLOOR, write_detector_report
    from analysis.scorecard import parse_token_class

    classes = [parse_token_class(t) for t in args.tokens]
    suite = load_suite_from_args(args)
    entries = write_detector_report(suite, classes, args.out, n_tokens=args.n_tokens, progress=args.progress)
    print(f"{'class':<10} {'dictionary':<10} {'feature':>7} {'spec':>6} {'sens':>6} {'|corr|':>6}  floor {FLOOR}")
    for e in entries:
        print(f"{e['token_class'][:10]:<10} {e['dictionary']:<10} {e['feature']:>7} {e['specificity']:>6.3f} "
              f"{e['sensitivity']:>6.3f} {e['max_neuron_corr']:>6.3f}  {'met' if e['meets_floor'] else 'NOT met'}")
    print(f"wrote {args.out / 'detectors.json'} and {args.out / 'index.html'}")
    return 0
