"""Command-line options for feature cards and labels, shared by the subcommands that write an explorer page.

    add_card_args(parser)                        # --cards-text, --cards-tokens, --cards-cache, --no-cards, --labels
    check_card_args(args, suite)                 # before tracing: bad options fail before any long work
    cards, labels, note = cards_from_args(args, suite, [("mlp1", 613), ("attn2", 17)])

``cards`` is ``{"mlp1:613": card}`` (``analysis/cards.py``), ``labels`` ``{"mlp1:613": short label}`` for every
requested feature (from the cards, from Neuronpedia with ``--labels neuronpedia``, or from the top logits
alone when no cards were made), and ``note`` is None or the line the explorer shows, e.g.
``"no feature cards: --no-cards was given"``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)


def add_card_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("feature cards and labels")
    g.add_argument("--cards-text", metavar="PATH_OR_DATASET", default=None,
                   help="held-out text for the feature cards: a folder of .txt/.py/.md files, a text file, or a "
                        "datasets name OWNER/NAME[:SPLIT]; default: the embedded corpus's held-out files (mini), "
                        "or online a slice of NeelNanda/pile-10k")
    g.add_argument("--cards-tokens", type=int, default=None, metavar="N",
                   help="held-out tokens the cards are built from (default 65536)")
    g.add_argument("--cards-cache", type=Path, default=None, metavar="DIR",
                   help="cache folder for the card statistics (default $CIRCUITS_CARDS_CACHE or ~/.cache/circuits-toolkit/cards)")
    g.add_argument("--no-cards", action="store_true", help="make no feature cards (labels then come from top logits only)")
    g.add_argument("--labels", choices=("auto", "neuronpedia"), default="auto",
                   help="auto: built from top tokens and logits; neuronpedia: the explanations neuronpedia.org "
                        "publishes for gpt2-small's dictionaries, where it has one (needs the network)")


def check_card_args(args: argparse.Namespace, suite) -> None:
    """Raise one clear error for a bad card option (a missing path, an empty folder, a non-positive token count,
    Neuronpedia labels for a suite it does not cover) before any long work. A dataset is loaded only when used."""
    from analysis.cards import NoCardText, card_text_source

    n_tokens = getattr(args, "cards_tokens", None)
    if n_tokens is not None and n_tokens <= 0:
        raise ValueError(f"--cards-tokens must be positive, got {n_tokens}")
    if getattr(args, "labels", "auto") == "neuronpedia" and suite.name != "gpt2-small":
        raise ValueError(f"--labels neuronpedia: Neuronpedia has no explanations for suite {suite.name!r}; use it with "
                         f"--model gpt2-small, or drop it for automatic labels")
    if not getattr(args, "no_cards", False):
        try:
            card_text_source(suite, getattr(args, "cards_text", None))
        except NoCardText:
            pass  # not an error: the explorer says that no cards were made


def cards_from_args(args: argparse.Namespace, suite, circuit_features: Iterable[tuple[str, int]]
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, str], str | None]:
    """Cards, labels and the explorer's note for ``circuit_features`` (``(dictionary, feature)`` pairs)."""
    from analysis.cards import (
        CardConfig, NoCardText, TextUnavailable, build_feature_cards, card_text_source, logit_labels,
    )
    from analysis.neuronpedia import neuronpedia_labels

    check_card_args(args, suite)
    features = list(dict.fromkeys((str(d), int(f)) for d, f in circuit_features))
    n_tokens = getattr(args, "cards_tokens", None)
    cards: dict[str, dict[str, Any]] = {}
    note: str | None = None
    if not features:
        return cards, {}, None
    if getattr(args, "no_cards", False):
        note = "no feature cards: --no-cards was given"
    else:
        try:
            source = card_text_source(suite, getattr(args, "cards_text", None))
        except NoCardText as e:
            source, note = None, str(e)
        if source is not None:
            config = CardConfig() if n_tokens is None else CardConfig(n_tokens=n_tokens)
            try:
                cards = build_feature_cards(suite, features, source, cache_dir=getattr(args, "cards_cache", None),
                                            progress=not getattr(args, "no_progress", False), config=config)
            except TextUnavailable as e:
                if not source.default:
                    raise
                # The default text is a convenience: if it cannot be loaded the graph is still written.
                note = f"no feature cards: the default text {source.name} could not be loaded ({e})"
    labels = {k: c["label"] for k, c in cards.items()} if cards else logit_labels(suite, features)
    if getattr(args, "labels", "auto") == "neuronpedia":
        published = neuronpedia_labels(suite.name, features)
        log.info("Neuronpedia explanations for %d of %d features", len(published), len(features))
        labels.update(published)
        for key, text in published.items():
            if key in cards:
                cards[key]["label"] = text
    return cards, labels, note


def circuit_features(nodes: Iterable[Any]) -> list[tuple[str, int]]:
    """``(dictionary, feature)`` of every feature node, in order of first appearance; nodes may be dicts or
    objects with ``kind``, ``layer`` and ``feature``."""
    from circuits.sites import FEATURE_KINDS, dictionary_name

    out: dict[tuple[str, int], None] = {}
    for n in nodes:
        get = n.get if isinstance(n, dict) else lambda k, n=n: getattr(n, k, None)
        if get("kind") in FEATURE_KINDS:
            out[(dictionary_name(get("kind"), int(get("layer"))), int(get("feature")))] = None
    return list(out)
