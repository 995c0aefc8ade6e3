"""Loading a suite folder written by ``scripts/build_mini.py`` (the shipped ``saes/mini``), and its extras.

The extras (``saes/mini/extras``, written by ``scripts/build_mini_extras.py``) show the other dictionary kinds on
the same model:

- ``mini-skip``: the mini suite with the layer-1 transcoder replaced by a skip transcoder (``extras/skip_mlp1``:
  256 features and ``W_skip``);
- ``mini-clt``: the model's attention SAEs and a cross-layer transcoder over its 4 MLPs (``extras/clt``) in place
  of the per-layer transcoders.
"""

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


EXTRAS = "extras"


def _selected(dictionaries, n_layers: int, allowed: tuple[str, ...]):
    from saes.pretrained import select_dictionaries

    return None if dictionaries is None else select_dictionaries(dictionaries, n_layers, allowed)


def load_mini_skip(directory: Path, device: str | torch.device = "cpu", dictionaries=None) -> Suite:
    """The mini suite with ``extras/skip_mlp1`` (a skip transcoder) as its layer-1 transcoder."""
    directory = Path(directory)
    extra = directory / EXTRAS / "skip_mlp1"
    if not (extra / "cfg.json").is_file():
        raise FileNotFoundError(f"no skip transcoder in {extra}; build it with `python -m scripts.build_mini_extras`")
    suite = load_mini(directory, device=device)
    suite.transcoders[1] = load_dictionary(extra, device=device)
    pick = _selected(dictionaries, suite.n_layers, ("attn", "mlp"))
    attn = suite.attn_saes if pick is None else {l: suite.attn_saes[l] for l in pick["attn"]}
    mlp = suite.transcoders if pick is None else {l: suite.transcoders[l] for l in pick["mlp"]}
    info = {**suite.info, "extra": "skip_mlp1", "dictionaries": [*(f"attn{l}" for l in attn), *(f"mlp{l}" for l in mlp)]}
    return Suite(name="mini-skip", model=suite.model, attn_saes=attn, transcoders=mlp, info=info)


def load_mini_clt(directory: Path, device: str | torch.device = "cpu", dictionaries=None) -> Suite:
    """The mini model with its attention SAEs and ``extras/clt`` (a cross-layer transcoder), no per-layer transcoders.
    ``dictionaries`` may narrow it (``{"clt"}`` for the CLT alone, ``{"clt", "attn0"}``, ...)."""
    from saes.clt import load_clt_dir

    directory = Path(directory)
    extra = directory / EXTRAS / "clt"
    if not (extra / "cfg.json").is_file():
        raise FileNotFoundError(f"no cross-layer transcoder in {extra}; build it with `python -m scripts.build_mini_extras`")
    suite = load_mini(directory, device=device)
    pick = _selected(dictionaries, suite.n_layers, ("attn", "clt")) or {"attn": sorted(suite.attn_saes), "clt": True}
    clt = load_clt_dir(extra, device=device) if pick["clt"] else None
    attn = {l: suite.attn_saes[l] for l in pick["attn"]}
    info = {**suite.info, "extra": "clt", "dictionaries": [*(f"attn{l}" for l in attn), *(["clt"] if clt else [])]}
    return Suite(name="mini-clt", model=suite.model, attn_saes=attn, transcoders={}, clt=clt, info=info)


def heldout_rows(suite, max_rows: int | None = None) -> torch.Tensor:
    """The held-out files of the corpus (fixed rule, ``saes/corpus.py``) as rows of the suite's context."""
    from saes.corpus import rows_from_stream, split_files, token_stream
    from saes.tokenizer import EOT

    tokenizer = suite.model.tokenizer
    eot = tokenizer.convert_tokens_to_ids(EOT)
    _, held = split_files()
    rows = rows_from_stream(token_stream(tokenizer._tokenizer, held, eot), suite.model.cfg.n_ctx, eot)
    return rows[:max_rows] if max_rows else rows
