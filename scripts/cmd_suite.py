"""``circuits suite-eval``: the quality of a suite's model and dictionaries on held-out text, as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common import add_model_args, dumps, load_suite_from_args, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suite-eval", help="held-out loss of the model; L0, explained variance, dead fraction and "
                                          "CE loss recovered of every dictionary")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON (else a table)")
    p.add_argument("--out", type=Path, default=None, help="also write OUT/suite_eval.json")
    p.add_argument("--rows", type=int, default=None, help="held-out rows to use (default: all of mini's; 64 for gpt2-small)")
    p.add_argument("--ce-rows", type=int, default=128, help="rows used for the CE losses (default 128)")
    p.add_argument("--text", type=Path, default=None, help="evaluate on this text file or folder of .py/.txt files "
                                                           "instead of the suite's own held-out text")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def heldout_text_rows(suite, args):
    """Rows of evaluation tokens: --text if given; mini's held-out files; for gpt2-small, OpenWebText."""
    import torch

    from saes.corpus import rows_from_stream

    tok = suite.model.tokenizer
    n_ctx = min(suite.model.cfg.n_ctx, 256)
    bos = tok.bos_token_id
    if args.text is not None:
        path = args.text
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".txt", ".md")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"--text {path}: no .py, .txt or .md files found")
        ids: list[int] = []
        for f in files:
            ids += [bos] + tok.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        return rows_from_stream(torch.tensor(ids), n_ctx, bos)[: args.rows]
    if suite.name == "gpt2-small":
        from datasets import load_dataset  # online path: the text the kk SAEs were trained on

        stream = load_dataset("Skylion007/openwebtext", split="train", streaming=True)
        ids = []
        want = (args.rows or 64) * (n_ctx - 1)
        for ex in stream:
            ids += [bos] + tok.encode(ex["text"], add_special_tokens=False)
            if len(ids) >= want:
                break
        return rows_from_stream(torch.tensor(ids), n_ctx, bos)[: args.rows or 64]
    from saes.mini_suite import heldout_rows

    return heldout_rows(suite, args.rows)


def run(args: argparse.Namespace) -> int:
    from saes.mini_recipe import evaluate_suite

    suite = load_suite_from_args(args)
    rows = heldout_text_rows(suite, args)
    report = evaluate_suite(suite, rows, progress=not args.no_progress, ce_rows=args.ce_rows)
    if args.out is not None:
        write_json(Path(args.out) / "suite_eval.json", report)
    if args.json:
        print(dumps(report))
    else:
        from tabulate import tabulate

        m = report["model"]
        print(f"{m['name']}: {m['n_layers']} layers, d_model {m['d_model']}, held-out loss {m['heldout_loss']:.4f} "
              f"over {m['heldout_tokens']} tokens")
        rows_ = [[d["name"], d["kind"], d["d_sae"], f"{d['l0']:.1f}", f"{d['explained_variance']:.3f}",
                  f"{d['dead_fraction']:.3f}", f"{d['ce_loss_recovered']:.3f}"] for d in report["dictionaries"]]
        print(tabulate(rows_, headers=["dictionary", "kind", "d_sae", "L0", "expl. var.", "dead", "CE recovered"]))
    return 0
