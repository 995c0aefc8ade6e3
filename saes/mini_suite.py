"""Loading a suite folder written by ``scripts/build_mini.py`` (the shipped ``saes/mini``)."""

from __future__ import annotations

from pathlib import Path

import torch

from saes.io import load_dictionary, load_model, read_json
from saes.suite import Suite
from saes.tokenizer import load_tokenizer


def load_mini(directory: Path, device: str | torch.device = "cpu") -> Suite:
    directory = Path(directory)
    if not (directory / "cfg.json").is_file():
        raise FileNotFoundError(
            f"no suite in {directory} (cfg.json missing); rebuild it with `python -m scripts.build_mini --out {directory}`"
        )
    tokenizer = load_tokenizer(directory / "tokenizer")
    model = load_model(directory, tokenizer=tokenizer, device=device)
    attn, mlp = {}, {}
    dict_root = directory / "dictionaries"
    for layer in range(model.cfg.n_layers):
        for prefix, store in (("attn", attn), ("mlp", mlp)):
            sub = dict_root / f"{prefix}{layer}"
            if sub.is_dir():
                store[layer] = load_dictionary(sub, device=device)
    info = read_json(directory / "cfg.json")
    if (directory / "metrics.json").is_file():
        info["metrics"] = read_json(directory / "metrics.json")
    return Suite(name=info.get("model_name") or "mini", model=model, attn_saes=attn, transcoders=mlp, info=info)


def heldout_rows(suite, max_rows: int | None = None) -> torch.Tensor:
    """The held-out files of the corpus (fixed rule, ``saes/corpus.py``) as rows of the suite's context."""
    from saes.corpus import rows_from_stream, split_files, token_stream
    from saes.tokenizer import EOT

    tokenizer = suite.model.tokenizer
    eot = tokenizer.convert_tokens_to_ids(EOT)
    _, held = split_files()
    rows = rows_from_stream(token_stream(tokenizer._tokenizer, held, eot), suite.model.cfg.n_ctx, eot)
    return rows[:max_rows] if max_rows else rows
