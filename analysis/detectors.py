"""Detector search: for each token class, the feature of any dictionary that best detects it.

1. One forward pass over the token set (every token except each row's BOS); at each dictionary's input hook,
   encode every feature.
2. For every feature of every dictionary and every class, accumulate: its total activation, its activation on
   the class's tokens, its maximum; and the activations on class tokens above 10% of the running maximum
   (an activation below 10% of the running maximum is below 10% of the final one, so nothing is lost).
3. Specificity = activation on the class / total activation; sensitivity = the share of the class's tokens
   on which the feature is above 10% of its final maximum (the definitions of ``analysis/scorecard.py``).
4. Rank the features by ``min(specificity, sensitivity)`` (a detector must be both), ties broken by their sum;
   the first is the class's detector. Its full scorecard and dashboard come from ``analysis/dashboards.py``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from analysis.scorecard import (
    DEFAULT_CLASSES, FIRE_FRACTION, TokenClass, TokenSet, class_mask, dictionary_input, heldout_token_set, vocab_texts,
)
from saes.dictionary import encode, spec_of

log = logging.getLogger(__name__)

FLOOR = 0.8  # specificity and sensitivity a detector must both reach (docs/dashboards.md)
ABLATION_ROWS = 32  # rows in which a detector's ablation is measured (dashboards use 8 to keep 64 pages quick)


@dataclass(frozen=True)
class Candidate:
    token_class: str
    dictionary: str
    feature: int
    specificity: float
    sensitivity: float

    @property
    def score(self) -> float:
        return min(self.specificity, self.sensitivity)


class _ClassStats:
    """Running sums for one (dictionary, class) pair."""

    def __init__(self, d_sae: int):
        self.class_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.kept_feature: list[Tensor] = []
        self.kept_value: list[Tensor] = []
        self.n_class = 0


@torch.inference_mode()
def rank_features(suite, classes: tuple[TokenClass, ...] | list[TokenClass], tokens: TokenSet, top: int = 10,
                  batch_rows: int = 16, progress: bool = False) -> dict[str, list[Candidate]]:
    """Steps 1 to 4: for each class name, the ``top`` features of all dictionaries, best first."""
    from tqdm.auto import tqdm

    if not classes:
        raise ValueError("no token classes given; name at least one, e.g. '.', 'for', 'import'")
    model = suite.model
    device = next(model.parameters()).device
    texts = vocab_texts(model.tokenizer, model.cfg.d_vocab)
    masks = {c.name: class_mask(c, tokens, texts)[:, 1:] for c in classes}
    for name, m in masks.items():
        if not m.any():
            raise ValueError(f"token class {name!r} never occurs in the {tokens.n_tokens} tokens searched; use more tokens")
    dicts = suite.dictionaries()
    specs = {n: spec_of(s) for n, s in dicts.items()}
    total = {n: torch.zeros(s.cfg.d_sae, dtype=torch.float64) for n, s in dicts.items()}
    maxima = {n: torch.zeros(s.cfg.d_sae) for n, s in dicts.items()}
    stats = {(n, c): _ClassStats(s.cfg.d_sae) for n, s in dicts.items() for c in masks}
    hooks = {sp.hook_in for sp in specs.values()}
    starts = range(0, tokens.rows.shape[0], batch_rows)
    for start in tqdm(starts, desc="detector search", disable=not progress):
        rows = tokens.rows[start : start + batch_rows]
        _, cache = model.run_with_cache(rows.to(device), names_filter=lambda n: n in hooks)
        for name, sae in dicts.items():
            hook = specs[name].hook_in
            acts = encode(sae, dictionary_input(cache[hook], hook))[:, 1:].float().cpu()  # drop BOS
            flat = acts.flatten(0, 1)
            total[name] += flat.sum(0, dtype=torch.float64)
            maxima[name] = torch.maximum(maxima[name], flat.amax(0))
            for cname, mask in masks.items():
                sub = flat[mask[start : start + batch_rows].flatten()]
                st = stats[(name, cname)]
                st.n_class += sub.shape[0]
                st.class_sum += sub.sum(0, dtype=torch.float64)
                pos, feat = (sub > FIRE_FRACTION * maxima[name]).nonzero(as_tuple=True)
                st.kept_feature.append(feat)
                st.kept_value.append(sub[pos, feat])
    ranking: dict[str, list[Candidate]] = {}
    for cname in masks:
        found: list[Candidate] = []
        for name in dicts:
            st = stats[(name, cname)]
            feat, val = torch.cat(st.kept_feature), torch.cat(st.kept_value)
            fired = torch.bincount(feat[val > FIRE_FRACTION * maxima[name][feat]], minlength=len(total[name]))
            spec = torch.where(total[name] > 0, st.class_sum / total[name].clamp_min(1e-30), torch.zeros_like(total[name]))
            sens = fired.double() / st.n_class
            score = torch.minimum(spec, sens) + 1e-6 * (spec + sens)
            for f in score.topk(min(top, len(score))).indices.tolist():
                found.append(Candidate(cname, name, int(f), round(float(spec[f]), 4), round(float(sens[f]), 4)))
        ranking[cname] = sorted(found, key=lambda c: (c.score, c.specificity + c.sensitivity), reverse=True)[:top]
    return ranking


def find_detectors(suite, classes=DEFAULT_CLASSES, tokens: TokenSet | None = None, n_tokens: int | None = None,
                   progress: bool = False) -> list[Candidate]:
    """The best detector of each class (step 4), in the order of ``classes``."""
    tokens = tokens if tokens is not None else heldout_token_set(suite.model, n_tokens)
    ranking = rank_features(suite, classes, tokens, progress=progress)
    return [ranking[c.name][0] for c in classes]


DETECTOR_KEYS = ("token_class", "dictionary", "feature", "specificity", "sensitivity", "max_neuron_corr", "top_logits", "bottom_logits")


def write_detector_report(suite, classes=DEFAULT_CLASSES, out_dir: Path = Path("out/detectors"), tokens: TokenSet | None = None,
                          n_tokens: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Search, then write ``detectors.json`` (one entry per class, keys ``DETECTOR_KEYS`` plus the page, the
    neuron and the ablation effect), ``ranking.json`` (the runners-up), one dashboard page per detector with its
    scorecard beside it, and ``index.html`` linking them."""
    from analysis.dashboards import _write_dashboards, write_index
    from saes.io import atomic_write_json

    out_dir = Path(out_dir)
    tokens = tokens if tokens is not None else heldout_token_set(suite.model, n_tokens)
    classes = list(classes)
    ranking = rank_features(suite, classes, tokens, progress=progress)
    best = {c.name: ranking[c.name][0] for c in classes}
    requests: dict[str, list[int]] = {}
    claims: dict[tuple[str, int], TokenClass] = {}
    for c in classes:
        b = best[c.name]
        requests.setdefault(b.dictionary, []).append(b.feature)
        claims.setdefault((b.dictionary, b.feature), c)
    pages, cards = _write_dashboards(suite, requests, out_dir, tokens, None, claims, progress, ablation_rows=ABLATION_ROWS)
    entries = []
    for c in classes:
        b = best[c.name]
        card = dict(cards[(b.dictionary, b.feature)])
        if card["token_class"] != c.name:  # one feature is the best detector of two classes: score it for this one
            from analysis.dashboards import build_dictionary_dashboards

            card = build_dictionary_dashboards(suite, b.dictionary, [b.feature], tokens, {b.feature: c},
                                               ablation_rows=ABLATION_ROWS).scorecards[b.feature]
        entry = {k: card[k] for k in DETECTOR_KEYS}
        entry.update(dashboard=pages[(b.dictionary, b.feature)], max_neuron=card["max_neuron"],
                     ablation_delta_loss=card["ablation_delta_loss"], meets_floor=bool(min(card["specificity"], card["sensitivity"]) >= FLOOR))
        entries.append(entry)
    atomic_write_json(out_dir / "detectors.json", entries)
    atomic_write_json(out_dir / "ranking.json", {k: [asdict(c) for c in v] for k, v in ranking.items()})
    write_index(out_dir, [dict(e, href=e["dashboard"]) for e in entries], f"{suite.name}: detectors over {tokens.n_tokens} held-out tokens")
    return entries
