"""Benchmark: one dictionary-training step, the trainer's sparse codes against the plain dense step, in one run.

    .venv/bin/python -m scripts.bench_train [--d-sae 1024 4096] [--k 24] [--batch 4096] [--d 128] [--steps 10]

The setting is the mini suite's: a transcoder of ``d = 128`` (the mini model's ``d_model``), 4,096 tokens a step,
BatchTopK at mean L0 ``k`` with a quarter of the latents dead (so the AuxK term runs, with the recipe's
``aux_k = 64``), and a TopK dictionary of the same k. Both paths compute the same loss and gradients
(``tests/test_train.py`` checks it): the baseline is ``saes.testing.dense_trainer_loss`` (flat top ``k * batch``
over the whole ``[batch, d_sae]`` code, dense decoder and AuxK matmuls), the trainer's is ``DictionaryTrainer.loss``
(per-row candidates, ``embedding_bag`` decodes).
Each timing is the median of ``--steps`` forward + backward passes after one warm-up. Prints a table; ``--out``
also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _time(fn, params, steps: int) -> float:
    times = []
    for i in range(steps + 1):
        for p in params:
            p.grad = None
        t = time.perf_counter()
        fn()[0].backward()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from saes.dictionary import DictionarySpec, build_dictionary
    from saes.io import atomic_write_json
    from saes.testing import dense_trainer_loss
    from saes.train import DictionaryTrainer, TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x_in, x_out = torch.randn(args.batch, args.d, generator=g), torch.randn(args.batch, args.d, generator=g)
    rows = []
    for d_sae in args.d_sae:
        for activation in ("jumprelu", "topk"):
            spec = DictionarySpec("transcoder", 0, args.d, d_sae, args.d, "in", "out", activation=activation, k=args.k)
            trainer = DictionaryTrainer(build_dictionary(spec, seed=0), TrainConfig(steps=10, aux_k=64, dead_after_tokens=1))
            trainer.since_fired[: d_sae // 4] = 10  # a quarter dead: AuxK on
            dense = _time(lambda: dense_trainer_loss(trainer, x_in, x_out), trainer.params, args.steps)
            sparse = _time(lambda: trainer.loss(x_in, x_out), trainer.params, args.steps)
            rows.append({"d_sae": d_sae, "activation": "BatchTopK" if activation == "jumprelu" else "TopK", "k": args.k,
                         "batch": args.batch, "dense_ms": 1000 * dense, "sparse_ms": 1000 * sparse, "speedup": dense / sparse})
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; "
          f"median of {args.steps} forward+backward passes")
    print(f"{'d_sae':>6} {'activation':>10} {'k':>3} {'batch':>6} {'dense ms':>9} {'sparse ms':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['d_sae']:>6} {r['activation']:>10} {r['k']:>3} {r['batch']:>6} {r['dense_ms']:>9.1f} "
              f"{r['sparse_ms']:>10.1f} {r['speedup']:>7.2f}x")
    if args.out:
        atomic_write_json(args.out, {"rows": rows, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
