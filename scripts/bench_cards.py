"""Benchmark: feature cards for every feature node of a traced circuit, built once (empty cache) and again
(cache filled), as ``circuits trace`` builds them.

    python -m scripts.bench_cards [--model mini] [--prompt TEXT] [--tokens 65536] [--threads 1] [--out FILE]

1. Trace the prompt (the ``make demo`` prompt by default) and collect its feature nodes' ``(dictionary, feature)``.
2. Build their cards with an empty temporary cache: token rows from the held-out text, one pass for all the
   dictionaries involved, statistics cached.
3. Build them again with the same cache: only the cache is read; the cards must be identical.
Times are wall-clock and process CPU time of steps 2 and 3 (including tokenisation and fingerprints), printed
and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DEMO_PROMPT = "import os\nimport sys\n\ndef main(args):\n    for name in args:\n        print(name"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mini")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--tokens", type=int, default=None, help="held-out tokens for the cards (default: the card default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the timings here as JSON")
    args = p.parse_args(argv)

    import torch

    from analysis.cards import CardConfig, build_feature_cards, card_text_source
    from circuits.trace import trace
    from scripts.cards_args import circuit_features
    from saes.suite import load_suite

    torch.set_num_threads(args.threads)
    suite = load_suite(args.model)
    circuit = trace(suite, args.prompt, None, faithfulness=False, progress=False).circuit
    features = circuit_features(circuit.nodes())
    config = CardConfig() if args.tokens is None else CardConfig(n_tokens=args.tokens)
    source = card_text_source(suite, None)
    with tempfile.TemporaryDirectory(prefix="bench-cards-") as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        first = build_feature_cards(suite, features, source, cache_dir=Path(cache), progress=False, config=config)
        t1, c1 = time.perf_counter(), time.process_time()
        again = build_feature_cards(suite, features, source, cache_dir=Path(cache), progress=False, config=config)
        t2, c2 = time.perf_counter(), time.process_time()
    if again != first:
        raise SystemExit("the cached cards differ from the first ones")
    result = dict(model=args.model, n_features=len(features), dictionaries=sorted({d for d, _ in features}),
                  n_tokens=config.n_tokens, threads=args.threads, first_s=round(t1 - t0, 2), cached_s=round(t2 - t1, 2),
                  first_cpu_s=round(c1 - c0, 2), cached_cpu_s=round(c2 - c1, 2))
    print(f"{len(features)} feature cards over {len(result['dictionaries'])} dictionaries, {config.n_tokens} held-out tokens, "
          f"{args.threads} thread(s): first {result['first_s']:.2f} s ({result['first_cpu_s']:.2f} s CPU), "
          f"cached {result['cached_s']:.2f} s ({result['cached_cpu_s']:.2f} s CPU)")
    if args.out:
        from saes.io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
