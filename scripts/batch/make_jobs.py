"""``circuits batch make-jobs``: a job file from a text source and a target rule, or dashboards of many features.

1. Texts from a source: ``mini-heldout`` (the held-out files of the mini corpus, ``saes/corpus.py``), a local
   folder (every file matching ``--glob``, sorted), ``hf:NAME[:SPLIT]`` (``datasets.load_dataset``) or
   ``hf-disk:PATH`` (``datasets.load_from_disk``), reading the ``--text-column`` column.
2. Snippets: consecutive non-blank lines of a text, as many as fit in ``max_tokens`` tokens (BOS included), in
   order; the count is checked with the suite's own tokenisation, the one ``circuits trace`` uses.
3. A target rule turns each snippet into jobs:
   ``default``         one job, the trace's default target (the most active last-layer transcoder feature at the end);
   ``fires:DICT:F[>T]`` one job per position where feature F of DICT is active above T (default 0), e.g.
                       ``fires:mlp0:917`` for the ``import`` detector of mini (docs/dashboards.md).
4. Jobs are numbered in that order (``s000012`` for a snippet, ``s000012-p7`` for a position) up to ``max_jobs``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

RULE_HELP = "default, or fires:DICT:F[>THRESHOLD] (e.g. fires:mlp0:917 or fires:mlp0:689>0.5)"


@dataclass(frozen=True)
class TargetRule:
    kind: str  # "default" | "fires"
    dictionary: str | None = None
    feature: int | None = None
    threshold: float = 0.0


def parse_rule(text: str) -> TargetRule:
    if text == "default":
        return TargetRule("default")
    m = re.fullmatch(r"fires:((?:attn|mlp)\d+):(\d+)(?:>(-?[0-9.eE+-]+))?", text)
    if not m:
        raise ValueError(f"--target-rule {text!r} is not a rule; use {RULE_HELP}")
    try:
        thr = float(m.group(3)) if m.group(3) else 0.0
    except ValueError:
        raise ValueError(f"--target-rule {text!r}: the threshold after '>' must be a number") from None
    return TargetRule("fires", m.group(1), int(m.group(2)), thr)


def iter_texts(source: str, glob: str = "**/*", text_column: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) pairs of a source, in a fixed order."""
    if source == "mini-heldout":
        from saes.corpus import read_text, split_files, stdlib_root

        root = stdlib_root()
        for p in split_files()[1]:
            yield p.relative_to(root).as_posix(), read_text(p)
        return
    if source.startswith(("hf:", "hf-disk:")):
        import datasets

        if source.startswith("hf-disk:"):
            ds = datasets.load_from_disk(source[len("hf-disk:"):])
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
        else:
            name, _, split = source[len("hf:"):].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        if text_column not in ds.column_names:
            raise ValueError(f"{source}: no column {text_column!r}; it has {', '.join(ds.column_names)}: pass --text-column")
        for i, row in enumerate(ds):
            yield f"row{i}", str(row[text_column])
        return
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"--source {source!r} is neither mini-heldout, hf:NAME[:SPLIT], hf-disk:PATH nor a folder")
    files = sorted(p for p in folder.glob(glob) if p.is_file())
    if not files:
        raise FileNotFoundError(f"--source {source}: no file matches --glob {glob!r}")
    for p in files:
        try:
            yield p.relative_to(folder).as_posix(), p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary file in a text folder


def snippets(suite, text: str, max_tokens: int, min_tokens: int = 4) -> Iterator[tuple[int, str]]:
    """(first line number, snippet) of runs of non-blank lines fitting ``max_tokens`` tokens with BOS."""
    tok = suite.model.tokenizer
    lines = text.splitlines(keepends=True)

    def n_tokens(s: str) -> int:
        return int(suite.model.to_tokens(s, prepend_bos=True, truncate=False).shape[1])

    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        start, chunk, est = i, "", 1
        while i < len(lines) and lines[i].strip():
            cost = len(tok.encode(lines[i], add_special_tokens=False))
            if est + cost > max_tokens and chunk:
                break
            chunk, est = chunk + lines[i], est + cost
            i += 1
            if est > max_tokens:
                break
        while chunk and n_tokens(chunk) > max_tokens:  # the estimate can miss merges across lines
            cut = chunk.rstrip("\n").rfind("\n")
            chunk = chunk[: cut + 1] if cut >= 0 else ""
        if chunk and n_tokens(chunk) >= min_tokens:
            yield start + 1, chunk


def trace_jobs(suite, source: str, rule: TargetRule, max_jobs: int, max_tokens: int = 32, glob: str = "**/*",
               text_column: str = "text", options: dict[str, Any] | None = None, max_per_snippet: int | None = None) -> list[dict[str, Any]]:
    """Steps 1-4 of the module docstring."""
    if max_jobs <= 0:
        raise ValueError(f"--max-jobs must be positive, got {max_jobs}")
    if max_tokens < 2 or max_tokens > suite.model.cfg.n_ctx:
        raise ValueError(f"--max-tokens must be between 2 and the model's context {suite.model.cfg.n_ctx}, got {max_tokens}")
    if rule.kind == "fires":
        from analysis.cards import card_dictionary
        from analysis.dashboards import prompt_feature_acts
        from analysis.scorecard import check_features

        check_features(card_dictionary(suite, rule.dictionary), rule.dictionary, [rule.feature])
    jobs: list[dict[str, Any]] = []
    n_snip = 0
    for name, text in iter_texts(source, glob, text_column):
        for line, snip in snippets(suite, text, max_tokens):
            sid = f"s{n_snip:06d}"
            n_snip += 1
            meta = dict(source=name, line=line)
            if rule.kind == "default":
                jobs.append(dict(id=sid, kind="trace", prompt=snip, meta=meta, **(options or {})))
            else:
                _, acts, _ = prompt_feature_acts(suite, rule.dictionary, snip)
                positions = [p for p in (acts[:, rule.feature] > rule.threshold).nonzero()[:, 0].tolist() if p > 0]
                for p in positions[:max_per_snippet]:
                    jobs.append(dict(id=f"{sid}-p{p}", kind="trace", prompt=snip, target=f"{rule.dictionary}:{rule.feature}@{p}",
                                     meta=meta, **(options or {})))
            if len(jobs) >= max_jobs:
                return jobs[:max_jobs]
    return jobs


def parse_feature_range(text: str, d_sae: int) -> list[int]:
    """``all``, ``0-63`` or ``3,17,40``."""
    if text == "all":
        return list(range(d_sae))
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    try:
        feats = list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--features {text!r}: use all, a range such as 0-63, or a list such as 3,17") from None
    bad = [f for f in feats if not 0 <= f < d_sae]
    if not feats or bad:
        raise ValueError(f"--features {text!r}: give indices in 0..{d_sae - 1}")
    return feats


def dashboard_jobs(suite, dictionaries: str, features: str, per_job: int, n_tokens: int | None = None) -> list[dict[str, Any]]:
    """Dashboards of ``features`` of each dictionary (``all`` or ``mlp0,attn1``), ``per_job`` features per job."""
    if per_job <= 0:
        raise ValueError(f"--per-job must be positive, got {per_job}")
    from analysis.dashboards import check_dashboard_dictionaries

    names = list(suite.dictionaries()) if dictionaries == "all" else [d.strip() for d in dictionaries.split(",") if d.strip()]
    check_dashboard_dictionaries(suite, names)
    jobs = []
    for name in names:
        feats = parse_feature_range(features, suite.dictionary(name).cfg.d_sae)
        for i in range(0, len(feats), per_job):
            job = dict(id=f"dash-{name}-{i // per_job:04d}", kind="dashboard", dictionary=name, features=feats[i:i + per_job])
            if n_tokens:
                job["n_tokens"] = n_tokens
            jobs.append(job)
    return jobs
