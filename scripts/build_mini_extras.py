"""Train the mini suite's optional extras: a skip transcoder at layer 1 and a cross-layer transcoder.

    python -m scripts.build_mini_extras [--suite saes/mini] [--out saes/mini/extras] [--steps 600]

1. Training rows: the training files of the corpus, tokenised as the suite was (``saes/corpus.py``).
2. One seeded stream of batches (``BATCH_ROWS`` rows of 256 tokens); each step runs the suite's model once and
   caches every layer's ``ln2.hook_normalized`` and ``hook_mlp_out``.
3. ``skip_mlp1``: a skip transcoder (``W_skip`` plus ``D_SAE_SKIP`` features, BatchTopK at mean L0 ``K_SKIP``,
   used as JumpReLU) from ``blocks.1.ln2.hook_normalized`` to ``blocks.1.hook_mlp_out``, trained by
   ``saes/train.py``.
4. ``clt``: a cross-layer transcoder over the 4 layers (``D_SAE_CLT`` features a layer, BatchTopK at mean L0
   ``K_CLT`` a layer, used as JumpReLU), trained by ``saes/train_clt.py``.
5. Score both on held-out rows (explained variance of each MLP output, L0) and write each folder
   (safetensors + ``cfg.json`` + ``metrics.json``) under ``--out``, atomically.

``load_suite("mini-skip")`` and ``load_suite("mini-clt")`` load them (``saes/mini_suite.py``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

D_SAE_SKIP, K_SKIP = 256, 16
D_SAE_CLT, K_CLT = 256, 8
BATCH_ROWS = 4
SEED = 0
EVAL_ROWS = 32


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", type=Path, default=None, help="the mini suite folder (default: the shipped one)")
    p.add_argument("--out", type=Path, default=None, help="where to write the extras (default: SUITE/extras)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from saes.corpus import iterate_batches, rows_from_stream, split_files, token_stream
    from saes.dictionary import DictionarySpec, build_dictionary, encode, reconstruct
    from saes.io import atomic_write_json, save_dictionary
    from saes.mini_suite import heldout_rows, load_mini
    from saes.suite import MINI_DIR
    from saes.tokenizer import EOT
    from saes.train import DictionaryTrainer, TrainConfig
    from saes.train_clt import build_clt, train_clt

    torch.set_num_threads(args.threads)
    suite_dir = args.suite or MINI_DIR
    out = args.out or suite_dir / "extras"
    suite = load_mini(suite_dir)
    model = suite.model
    n, d = model.cfg.n_layers, model.cfg.d_model
    tok = model.tokenizer
    eot = tok.convert_tokens_to_ids(EOT)
    train_files, _ = split_files()
    rows = rows_from_stream(token_stream(tok._tokenizer, train_files, eot), model.cfg.n_ctx, eot)
    ins = [f"blocks.{l}.ln2.hook_normalized" for l in range(n)]
    outs = [f"blocks.{l}.hook_mlp_out" for l in range(n)]

    def activations(batch):
        with torch.no_grad():
            _, cache = model.run_with_cache(batch, names_filter=lambda h: h in ins or h in outs)
        return (torch.stack([cache[h].reshape(-1, d) for h in ins]), torch.stack([cache[h].reshape(-1, d) for h in outs]))

    cfg = TrainConfig(steps=args.steps, lr=2e-3, warmup_steps=50, decay_fraction=0.3, seed=SEED)
    spec = DictionarySpec.transcoder(1, d, D_SAE_SKIP, activation="jumprelu", k=K_SKIP, skip=True, model_name=model.cfg.model_name)
    skip_tc = build_dictionary(spec, seed=SEED, context_size=model.cfg.n_ctx)
    skip_trainer = DictionaryTrainer(skip_tc, cfg)
    clt = build_clt(n, d, D_SAE_CLT, seed=SEED, model_name=model.cfg.model_name)

    start = time.time()
    skip_hist: list[dict] = []

    def shared_stream():
        """Each batch's activations, after the skip transcoder has taken its step on layer 1 of them."""
        for batch in iterate_batches(rows, BATCH_ROWS, seed=SEED + 1):
            x, y = activations(batch)
            stats = skip_trainer.step((x[1], y[1]))
            if stats.step % 50 == 0 or stats.step == args.steps:
                skip_hist.append({"step": stats.step, "mse": stats.mse, "l0": stats.l0})
            yield x, y

    clt_hist = train_clt(clt, shared_stream(), cfg, k=K_CLT, progress=not args.no_progress)
    for prm in skip_trainer.params:
        prm.requires_grad_(False)
    train_s = time.time() - start
    logging.info("trained both in %.0f s", train_s)

    held = heldout_rows(suite, EVAL_ROWS)
    x, y = activations(held)

    def ev(target, recon):
        return float(1 - (target - recon).pow(2).sum() / (target - target.mean(0)).pow(2).sum())

    with torch.no_grad():
        skip_metrics = {"explained_variance": ev(y[1], reconstruct(skip_tc, x[1])),
                        "l0": float((encode(skip_tc, x[1]) != 0).float().sum(-1).mean()),
                        "explained_variance_without_skip": ev(y[1], reconstruct(skip_tc, x[1]) - x[1] @ skip_tc.W_skip.T)}
        acts = [clt.encode(l, x[l]) for l in range(n)]
        recon = clt.decode(acts)
        clt_metrics = {"explained_variance": [ev(y[t], recon[t]) for t in range(n)],
                       "l0": [float((a != 0).float().sum(-1).mean()) for a in acts]}
    common = {"heldout_tokens": int(held.numel()), "steps": args.steps, "batch_tokens": BATCH_ROWS * model.cfg.n_ctx,
              "train_seconds": round(train_s, 1), "threads": args.threads}
    save_dictionary(skip_tc, out / "skip_mlp1")
    atomic_write_json(out / "skip_mlp1" / "metrics.json", {**skip_metrics, **common, "history": skip_hist})
    clt.save(out / "clt")
    atomic_write_json(out / "clt" / "metrics.json", {**clt_metrics, **common, "history": clt_hist.history})
    logging.info("skip_mlp1 %s", skip_metrics)
    logging.info("clt %s", clt_metrics)


if __name__ == "__main__":
    main()
