"""Rebuild the embedded "mini" suite from scratch, seeded and resumable.

    python -m scripts.build_mini [--work runs/mini-build] [--out saes/mini] [--device cpu|cuda] [--until PHASE]

Phases, each skipped when its output already exists in ``--work`` (so a killed build resumes):
1. ``tokenizer``: a byte-level BPE (4,096 tokens) trained on the training files of the corpus
   (the running interpreter's standard library, ``saes/corpus.py``; held-out files by a fixed crc32 rule).
2. ``tokens``: the training and held-out files tokenised into rows of ``n_ctx`` tokens starting with BOS.
3. ``lm``: the 4-layer GPT-2-architecture model trained on next-token prediction, then processed as
   GPT-2 small is (``saes/lm.py``: folded LayerNorm, centred writing weights, folded value biases).
4. ``dictionaries``: an attention-output SAE on every ``blocks.L.attn.hook_z`` and an MLP transcoder from
   every ``blocks.L.ln2.hook_normalized`` to ``blocks.L.hook_mlp_out``, all trained on one stream of model
   activations by ``saes/train.py`` (TopK with AuxK; see ``saes/mini_recipe.py`` for the settings).
5. ``package``: evaluate every dictionary on held-out text (``saes/metrics.py``) and write the suite
   (safetensors + JSON) to ``--out``.
On two CPU cores a model step takes 0.7-0.95 s and a step of all eight dictionaries about 1 s, so the
model and the common 600-1,200 dictionary steps take 35-45 minutes, plus the steps the layer-0 and layer-2
transcoders take beyond the others (to 6,400 and 4,800; the forward pass stops after the last layer still
training). A dictionary can also be trained alone with the recipe's settings by ``scripts/try_dictionary.py``
and copied into the work folder: it equals the one trained within the suite (``tests/test_mini_recipe.py``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

PHASES = ("tokenizer", "tokens", "lm", "dictionaries", "package")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/mini-build"))
    p.add_argument("--out", type=Path, default=Path("saes/mini"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--until", choices=PHASES, default="package")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from saes import mini_recipe as recipe
    from saes.corpus import corpus_python, rows_from_stream, split_files, read_text, token_stream
    from saes.io import atomic_write_json, load_model, read_tensors, save_model, atomic_save_tensors
    from saes.lm import heldout_loss, process_weights, train_language_model
    from saes.tokenizer import EOT, load_tokenizer, train_bpe

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(recipe.LM.seed)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t0 = time.time()
    stop = PHASES.index(args.until)

    # 1. tokenizer
    tok_dir = work / "tokenizer"
    train_files, heldout_files = split_files()
    if not (tok_dir / "tokenizer.json").is_file():
        logging.info("phase tokenizer: BPE on %d files", len(train_files))
        train_bpe((read_text(f) for f in train_files), recipe.LM.d_vocab, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if stop == 0:
        return

    # 2. tokens
    tokens_path = work / "tokens.safetensors"
    if not tokens_path.is_file():
        logging.info("phase tokens")
        train_rows = rows_from_stream(token_stream(tokenizer._tokenizer, train_files, eot), recipe.LM.n_ctx, eot)
        held_rows = rows_from_stream(token_stream(tokenizer._tokenizer, heldout_files, eot), recipe.LM.n_ctx, eot)
        atomic_save_tensors({"train": train_rows, "heldout": held_rows}, tokens_path)
    rows = read_tensors(tokens_path)
    logging.info("train rows %s, held-out rows %s", tuple(rows["train"].shape), tuple(rows["heldout"].shape))
    if stop == 1:
        return

    # 3. language model
    lm_dir = work / "lm"
    if not (lm_dir / "model.safetensors").is_file():
        from transformer_lens import HookedTransformer

        logging.info("phase lm: %s", recipe.LM)
        model = HookedTransformer(recipe.LM.hooked_config(), tokenizer=tokenizer, move_to_device=False).to(args.device)
        history = train_language_model(model, rows["train"].to(args.device), recipe.LM, checkpoint_dir=work / "lm-ckpt",
                                       progress=progress, stop_after=recipe.LM_STOP_AFTER)
        process_weights(model)
        loss = heldout_loss(model, rows["heldout"][: recipe.EVAL_ROWS].to(args.device))
        logging.info("held-out loss %.4f", loss)
        save_model(model, lm_dir, extra={"heldout_loss": loss, "corpus_python": corpus_python(),
                                          "trained_steps": recipe.LM_STOP_AFTER, "schedule_steps": recipe.LM.steps})
        atomic_write_json(work / "lm_history.json", history)
    if stop == 2:
        return

    # 4. dictionaries
    model = load_model(lm_dir, tokenizer=tokenizer, device=args.device)
    dict_dir = work / "dictionaries"
    if not (dict_dir / "done.json").is_file():
        logging.info("phase dictionaries")
        recipe.train_suite_dictionaries(model, rows["train"], dict_dir, device=args.device, progress=progress)
        atomic_write_json(dict_dir / "done.json", {"seconds": time.time() - t0})
    if stop == 3:
        return

    # 5. package
    logging.info("phase package")
    out: Path = args.out
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copytree(tok_dir, staging / "tokenizer")
    model.cpu()
    save_model(model, staging, extra=load_raw_extra(lm_dir))
    shutil.copytree(dict_dir, staging / "dictionaries", ignore=shutil.ignore_patterns("*.tmp", "done.json", "trainer.*"))
    report = recipe.evaluate_suite_dir(staging)
    atomic_write_json(staging / "metrics.json", report)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    logging.info("wrote %s in %.0f s", out, time.time() - t0)


def load_raw_extra(lm_dir: Path) -> dict:
    from saes.io import MODEL_CFG_FIELDS, read_json

    raw = read_json(lm_dir / "cfg.json")
    return {k: v for k, v in raw.items() if k not in MODEL_CFG_FIELDS}


if __name__ == "__main__":
    main()
