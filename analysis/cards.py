"""Feature cards: what a dictionary feature responds to and what it writes, for the circuit explorer.

1. *Text*: rows of held-out tokens, each starting with BOS (:func:`card_text_source` resolves where they come
   from: the embedded corpus's held-out files for ``mini``, otherwise a folder, a text file or a ``datasets``
   dataset that the user names).
2. *One pass* over those rows for every requested dictionary at once: one forward pass of the model per batch
   of rows, stopped after the deepest requested layer; each dictionary encodes its input hook. For *all* of a
   dictionary's features it keeps (BOS positions excluded):
   a. a running top-k over rows of each feature's maximum in the row (and where in the row it is), so the
      top contexts come from distinct rows;
   b. an exact histogram of its non-zero activations with ``n_bins`` equal half-open bins over ``[0, R_f)``.
      ``R_f`` is a power of two: it starts as the smallest one above the feature's first non-zero batch
      maximum and doubles, merging adjacent bins pairwise, whenever an activation reaches it. Halving a
      power-of-two range is exact in floating point, so the counts equal those of a histogram made after the
      fact with the final range, in one pass and without knowing the maximum in advance; at the end the
      maximum lies in ``[R_f / 2, R_f)``. Counts sum to the number of tokens on which the feature is active;
   c. the number of tokens on which it is active.
3. *Cache*: per dictionary, those statistics as safetensors plus a JSON description, under
   ``<cache>/<suite>-<key>/<dictionary>.safetensors``. The key hashes a fingerprint of the model's weights, the
   token rows and the card settings; the file records a fingerprint of the dictionary's weights. A file that
   is unreadable or was made for other weights is rebuilt, with a warning. The cache folder is the argument
   ``cache_dir``, else ``$CIRCUITS_CARDS_CACHE``, else ``~/.cache/circuits-toolkit/cards``.
4. *Cards*: for each requested feature, its top contexts (the token at the row maximum highlighted, ``before``
   tokens before and ``after`` after it), its top and bottom logits (the decoder direction, for an attention
   SAE first through each head's ``W_O`` and summed over heads, centred over ``d_model`` as the final
   LayerNorm does, then read through ``W_U``), its histogram trimmed to the occupied bins, scorecard numbers
   where a scorecard was computed (``analysis/scorecard.py``; never computed here) and a dashboard link that
   the caller fills. A skip transcoder's card is that of its features alone (the skip path ``x @ W_skip.T``
   is not a feature).
   A cross-layer transcoder's feature of read layer ``L`` (card key ``mlp{L}:{f}``, like a transcoder's) is
   encoded by the CLT's layer-``L`` encoder from ``blocks.L.ln2.hook_normalized``; it writes one decoder vector
   into every MLP output from layer ``L`` on, and every write stays in the residual stream up to the
   unembedding, so its logit effect is the *sum* of those decoder vectors, centred, through ``W_U``.
5. *Labels* (:func:`auto_label`): the top activating tokens and the top logits, e.g.
   ``on " import" → " os" " sys"``.

Neuronpedia's published explanations can replace the automatic labels on request (``analysis/neuronpedia.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analysis.scorecard import TokenSet, check_features, dictionary_input, token_set_from_texts, token_text
from saes.dictionary import encode, spec_of

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_ENV = "CIRCUITS_CARDS_CACHE"
DEFAULT_DATASET = "NeelNanda/pile-10k:train[:2000]"  # a slice: the first 2,000 documents
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")
# Numbers of a scorecard (analysis/scorecard.py) shown on a card.
SCORECARD_FIELDS = ("specificity", "sensitivity", "density", "max_act", "max_neuron_corr", "ablation_delta_loss")


@dataclass(frozen=True)
class CardConfig:
    """Settings of the card pass. ``n_tokens`` counts held-out tokens without the BOS of each row (None: all of
    the text); ``n_ctx`` is the row length (None: the model's context, at most 256)."""

    n_tokens: int | None = 65_536
    n_ctx: int | None = None
    n_contexts: int = 8
    before: int = 8
    after: int = 3
    n_logits: int = 8
    n_bins: int = 32
    batch_elements: int = 1 << 24  # rows per batch = this / (n_ctx * d_sae): bounds the activations held at once

    def __post_init__(self) -> None:
        if self.n_tokens is not None and self.n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive or None (all of the text), got {self.n_tokens}")
        if self.n_ctx is not None and self.n_ctx < 2:
            raise ValueError(f"n_ctx must be at least 2 (BOS and one token), got {self.n_ctx}")
        for name in ("n_contexts", "n_logits", "batch_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.before < 0 or self.after < 0:
            raise ValueError(f"before and after must be >= 0, got {self.before} and {self.after}")
        if self.n_bins < 2 or self.n_bins & (self.n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2 (bins merge pairwise), got {self.n_bins}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class NoCardText(ValueError):
    """There is no text to build cards from; the message is the note the explorer shows."""


class TextUnavailable(ValueError):
    """A named dataset could not be loaded (no network and no local cache, or no such dataset)."""


# ----------------------------------------------------------------------------------------------------------
# 1. Text


@dataclass(frozen=True)
class CardText:
    """Where the held-out text comes from: ``corpus`` (the embedded corpus's held-out files), ``file``,
    ``folder`` (its .txt/.py/.md/.rst files, recursively, sorted) or ``dataset`` (``NAME[:SPLIT]`` of the
    ``datasets`` library; its ``text`` column, else its first string column). ``default`` marks a dataset
    chosen because the user named none."""

    kind: str
    name: str
    default: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("corpus", "file", "folder", "dataset"):
            raise ValueError(f"unknown text kind {self.kind!r}; use corpus, file, folder or dataset")

    def describe(self) -> str:
        return "the embedded corpus's held-out files" if self.kind == "corpus" else f"{self.kind} {self.name}"

    def texts(self) -> Iterator[str]:
        from saes.corpus import read_text, split_files

        if self.kind == "corpus":
            _, held = split_files()
            if not held:
                raise FileNotFoundError("no held-out files found in this interpreter's standard library")
            yield from (read_text(p) for p in held)
        elif self.kind == "file":
            yield read_text(Path(self.name))
        elif self.kind == "folder":
            yield from (read_text(p) for p in folder_files(Path(self.name)))
        else:
            yield from dataset_texts(self.name)


def folder_files(folder: Path) -> list[Path]:
    files = sorted((p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"the folder {folder} holds no {'/'.join(TEXT_SUFFIXES)} files; name a folder of text or a text file")
    return files


def dataset_texts(spec: str) -> Iterator[str]:
    """The texts of ``NAME[:SPLIT]`` (split ``train`` by default), read with ``datasets``."""
    name, _, split = spec.partition(":")
    try:
        import datasets

        data = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the library raises many types for a missing network, name or split
        raise TextUnavailable(f"could not load the dataset {spec!r} ({type(e).__name__}: {e}); it needs the network or "
                         f"its local cache; name a local folder or text file instead") from e
    column = "text" if "text" in data.column_names else next(
        (c for c, f in data.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise ValueError(f"the dataset {spec!r} has no text column (columns: {', '.join(data.column_names)})")
    for row in data:
        if row[column]:
            yield row[column]


def has_embedded_corpus(suite) -> bool:
    """A suite built from the standard-library corpus (``saes/corpus.py``) records its Python version."""
    return "corpus_python" in getattr(suite, "info", {})


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def card_text_source(suite, text_arg: str | None) -> CardText:
    """Resolve ``text_arg`` (a path to a folder or text file, or a dataset ``NAME[:SPLIT]``) into a text source.

    Without ``text_arg``: the embedded corpus for a suite that has one; else, online, a slice of
    :data:`DEFAULT_DATASET`; else :class:`NoCardText` (a note, not a failure). A path that does not exist is an
    error."""
    if text_arg is None or text_arg == "":
        if has_embedded_corpus(suite):
            return CardText("corpus", "heldout")
        if hub_offline():
            raise NoCardText(f"no feature cards: suite {suite.name!r} has no embedded corpus and the hub is offline "
                             f"(HF_HUB_OFFLINE); name a folder or a text file with --cards-text")
        return CardText("dataset", DEFAULT_DATASET, default=True)
    path = Path(text_arg).expanduser()
    if path.is_dir():
        folder_files(path)  # fail now, before any long work, if it holds no text
        return CardText("folder", str(path.resolve()))
    if path.is_file():
        return CardText("file", str(path.resolve()))
    if text_arg.startswith((".", "/", "~")) or not _looks_like_dataset(text_arg):
        raise ValueError(f"--cards-text {text_arg!r}: no such file or folder, and not a dataset name; name a folder "
                         f"of .txt/.py files, a text file, or a dataset OWNER/NAME[:SPLIT] such as {DEFAULT_DATASET}")
    return CardText("dataset", text_arg)


def _looks_like_dataset(text: str) -> bool:
    name = text.partition(":")[0]
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)


def card_tokens(suite, text: CardText, config: CardConfig = CardConfig()) -> TokenSet:
    """The token rows of ``text`` under ``config`` (``n_tokens`` tokens, rows of ``n_ctx``)."""
    n_ctx = config.n_ctx or min(suite.model.cfg.n_ctx, 256)
    return token_set_from_texts(suite.model, text.texts(), n_tokens=config.n_tokens, n_ctx=n_ctx)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# 2. One pass


@dataclass(frozen=True)
class CardDictionary:
    """What the card pass needs of one named dictionary (:func:`card_dictionary`): where it reads, how it
    encodes, the tensors that identify it, and the residual-stream direction each feature writes in total."""

    name: str
    layer: int
    hook_in: str
    d_sae: int
    module: Any  # the dictionary (a sae-lens module) or the cross-layer transcoder
    clt: bool = False

    @property
    def cfg(self) -> Any:  # ``cfg.d_sae`` for ``check_features``
        return self.module.cfg

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.module.encode(self.layer, x) if self.clt else encode(self.module, x)

    def state(self) -> dict[str, Tensor]:
        """The tensors this dictionary's cards depend on (a CLT's: its layer's encoder and decoders)."""
        if not self.clt:
            return self.module.state_dict()
        m, l = self.module, self.layer
        out = {"W_enc": m.W_enc[l], "b_enc": m.b_enc[l], "W_dec": m.W_dec[l]}
        if m.threshold is not None:
            out["threshold"] = m.threshold[l]
        return out

    def resid_directions(self, model, features: list[int]) -> Float[Tensor, "feat d_model"]:
        """What one unit of each feature adds to the final residual stream, by direct paths: the decoder row
        (through each head's ``W_O``, summed, for an attention SAE); for a CLT the sum of its decoder vectors
        into every later layer, since each of them stays in the residual stream."""
        if self.clt:
            return self.module.W_dec[self.layer][features].detach().sum(1)
        w = self.module.W_dec[features].detach()
        if self.hook_in.endswith("hook_z"):
            n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
            w = torch.einsum("f h d, h d m -> f m", w.reshape(len(features), n_heads, d_head), model.W_O[self.layer].detach())
        return w


def card_dictionary(suite, name: str) -> CardDictionary:
    """The dictionary ``name`` (``attn2``, ``mlp1``) of ``suite``; ``mlp{L}`` of a suite with a cross-layer
    transcoder is that CLT's layer ``L``."""
    from circuits.sites import site

    s = site(name)
    clt = getattr(suite, "clt", None)
    if s.family == "mlp" and clt is not None and s.layer not in suite.transcoders:
        if not 0 <= s.layer < clt.n_layers:
            raise KeyError(f"suite {suite.name!r} has no dictionary {name!r}: its cross-layer transcoder has layers "
                           f"0..{clt.n_layers - 1}")
        return CardDictionary(name, s.layer, clt.hook_in(s.layer), clt.cfg.d_sae, clt, clt=True)
    sae = suite.dictionary(name)
    spec = spec_of(sae)
    return CardDictionary(name, spec.layer, spec.hook_in, sae.cfg.d_sae, sae)


@dataclass
class CardStats:
    """Step 2's statistics of every feature of one dictionary over one token set."""

    top_values: Float[Tensor, "d_sae k"]  # the k largest row maxima, descending; 0 where fewer rows fire
    top_rows: Int[Tensor, "d_sae k"]  # the rows they come from (-1: none)
    top_pos: Int[Tensor, "d_sae k"]  # the position of the maximum in its row
    hist_counts: Int[Tensor, "d_sae n_bins"]  # half-open bins of width hist_range / n_bins from 0
    hist_range: Float[Tensor, "d_sae"]  # a power of two above every activation; 0 for a feature that never fires
    n_active: Int[Tensor, "d_sae"]
    n_tokens: int

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, Tensor)}


class RunningStats:
    """Accumulates :class:`CardStats` for all features of one dictionary, batch by batch (step 2)."""

    def __init__(self, d_sae: int, k: int, n_bins: int, device: torch.device) -> None:
        self.k, self.n_bins = k, n_bins
        self.values = torch.full((d_sae, k), -math.inf, device=device)
        self.rows = torch.full((d_sae, k), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros((d_sae, k), dtype=torch.long, device=device)
        self.counts = torch.zeros((d_sae, n_bins), dtype=torch.long, device=device)
        self.range = torch.zeros(d_sae, device=device)
        self.n_active = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, acts: Float[Tensor, "batch pos d_sae"], first_row: int) -> None:
        acts = acts[:, 1:].float()  # BOS excluded
        b, p, f = acts.shape
        self.n_tokens += b * p
        # a. running top-k over rows of the per-row maximum
        row_max, arg = acts.max(dim=1)  # [b f]
        rows = torch.arange(first_row, first_row + b, device=acts.device).expand(f, b)
        values = torch.cat([self.values, row_max.T], dim=1)
        kept = values.topk(self.k, dim=1)
        self.values = kept.values
        self.rows = torch.cat([self.rows, rows], dim=1).gather(1, kept.indices)
        self.pos = torch.cat([self.pos, arg.T + 1], dim=1).gather(1, kept.indices)
        # b. histogram of non-zero activations; c. active counts
        flat = acts.reshape(b * p, f)
        batch_max = row_max.max(dim=0).values
        fresh = (self.range == 0) & (batch_max > 0)
        if fresh.any():
            self.range[fresh] = first_range(batch_max[fresh])
        while True:
            grow = (batch_max >= self.range) & (batch_max > 0)  # values stay below the range: bins are half-open
            if not grow.any():
                break
            half = self.n_bins // 2
            merged = self.counts[grow].view(-1, half, 2).sum(-1)
            self.counts[grow] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.range[grow] *= 2
        t, feat = (flat > 0).nonzero(as_tuple=True)
        if len(t):
            vals = flat[t, feat]
            # vals < range, both scaled by powers of two only: the bin is exact and below n_bins
            bins = (vals / self.range[feat] * self.n_bins).floor().long()
            self.counts += torch.bincount(feat * self.n_bins + bins, minlength=f * self.n_bins).view(f, self.n_bins)
            self.n_active += torch.bincount(feat, minlength=f)

    def result(self) -> CardStats:
        fired = self.values > 0
        return CardStats(
            top_values=torch.where(fired, self.values, torch.zeros_like(self.values)).cpu(),
            top_rows=torch.where(fired, self.rows, torch.full_like(self.rows, -1)).cpu(),
            top_pos=torch.where(fired, self.pos, torch.zeros_like(self.pos)).cpu(),
            hist_counts=self.counts.cpu(), hist_range=self.range.cpu(), n_active=self.n_active.cpu(),
            n_tokens=self.n_tokens,
        )


def first_range(maxima: Float[Tensor, "n"]) -> Float[Tensor, "n"]:
    """The smallest power of two strictly above each (positive) maximum."""
    r = torch.exp2(torch.floor(torch.log2(maxima)) + 1)
    r = torch.where(r / 2 > maxima, r / 2, r)  # log2 rounded up just below a power of two
    return torch.where(r <= maxima, r * 2, r)


@torch.inference_mode()
def collect_card_stats(suite, dictionaries: list[str], tokens: TokenSet, config: CardConfig = CardConfig(),
                       progress: bool = True) -> dict[str, CardStats]:
    """Step 2 for ``dictionaries``: one forward pass per batch of rows for all of them together."""
    from tqdm.auto import tqdm

    model = suite.model
    saes = {name: card_dictionary(suite, name) for name in dictionaries}
    device = next(model.parameters()).device
    n_rows, n_ctx = tokens.rows.shape
    widest = max(sae.d_sae for sae in saes.values())
    batch_rows = max(1, config.batch_elements // (n_ctx * widest))
    hooks = {sae.hook_in for sae in saes.values()}
    stop = max(sae.layer for sae in saes.values()) + 1
    running = {name: RunningStats(sae.d_sae, config.n_contexts, config.n_bins, device) for name, sae in saes.items()}
    for start in tqdm(range(0, n_rows, batch_rows), desc="feature cards", disable=not progress):
        toks = tokens.rows[start : start + batch_rows].to(device)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in hooks, stop_at_layer=stop)
        for name, sae in saes.items():
            running[name].update(sae.encode(dictionary_input(cache[sae.hook_in], sae.hook_in)), start)
        del cache
    return {name: r.result() for name, r in running.items()}


# ----------------------------------------------------------------------------------------------------------
# 3. Cache


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "circuits-toolkit" / "cards"


def weights_fingerprint(state: Mapping[str, Tensor], sample: int = 1 << 20) -> str:
    """sha256 over each tensor's name, shape, dtype and values (for tensors over ``sample`` elements, an evenly
    strided sample of about ``sample`` of them: enough to tell checkpoints apart at a fraction of the time)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel() > sample:
            flat = flat[:: flat.numel() // sample]
        h.update(flat.contiguous().cpu().numpy().tobytes() if flat.dtype != torch.bfloat16 else flat.float().cpu().numpy().tobytes())
    return h.hexdigest()


def suite_cache_dir(suite, tokens: TokenSet, config: CardConfig, cache_dir: Path | None = None) -> Path:
    h = hashlib.sha256()
    h.update(f"cards-v{FORMAT_VERSION}|".encode())
    h.update(weights_fingerprint(suite.model.state_dict()).encode())
    h.update(tokens.rows.contiguous().numpy().astype("int64").tobytes())
    h.update(json.dumps(_stats_settings(config), sort_keys=True).encode())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in suite.name)
    return Path(cache_dir or default_cache_dir()) / f"{safe}-{h.hexdigest()[:16]}"


def _stats_settings(config: CardConfig) -> dict[str, Any]:
    """The settings that change the cached statistics (not how cards are drawn from them)."""
    return dict(n_contexts=config.n_contexts, n_bins=config.n_bins)


def load_cached_stats(folder: Path, name: str, dict_hash: str) -> CardStats | None:
    """The cached statistics of dictionary ``name``, or None when absent, unreadable or made for other weights."""
    from safetensors import safe_open

    path = folder / f"{name}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("dictionary_hash") != dict_hash or int(meta.get("format", -1)) != FORMAT_VERSION:
            log.warning("feature-card cache %s was made for other weights or another format; rebuilding it", path)
            return None
        stats = CardStats(n_tokens=int(meta["n_tokens"]), **tensors)
        d_sae = stats.n_active.shape[0]
        if any(t.shape[0] != d_sae for t in stats.tensors().values()):
            raise ValueError("tensor shapes disagree")
        return stats
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail the trace
        log.warning("feature-card cache %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


def save_stats(folder: Path, name: str, stats: CardStats, dict_hash: str, description: dict[str, Any]) -> None:
    from saes.io import atomic_save_tensors, atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(format=str(FORMAT_VERSION), dictionary_hash=dict_hash, n_tokens=str(stats.n_tokens))
    atomic_save_tensors(stats.tensors(), folder / f"{name}.safetensors", metadata=meta)
    atomic_write_json(folder / f"{name}.json", dict(description, dictionary=name, dictionary_hash=dict_hash,
                                                     n_tokens=stats.n_tokens, format=FORMAT_VERSION))


def dictionary_stats(suite, dictionaries: Iterable[str], tokens: TokenSet, config: CardConfig = CardConfig(),
                     cache_dir: Path | None = None, progress: bool = True,
                     description: dict[str, Any] | None = None) -> dict[str, CardStats]:
    """Step 2's statistics of each dictionary, from the cache where it holds them, else from one pass (step 3)."""
    names = list(dict.fromkeys(dictionaries))
    folder = suite_cache_dir(suite, tokens, config, cache_dir)
    hashes = {n: weights_fingerprint(card_dictionary(suite, n).state()) for n in names}
    found = {n: s for n in names if (s := load_cached_stats(folder, n, hashes[n])) is not None}
    missing = [n for n in names if n not in found]
    if missing:
        log.info("feature cards: one pass over %d tokens for %s (cache %s)", tokens.n_tokens, ", ".join(missing), folder)
        fresh = collect_card_stats(suite, missing, tokens, config, progress)
        for n in missing:
            save_stats(folder, n, fresh[n], hashes[n], dict(description or {}, suite=suite.name, settings=_stats_settings(config)))
        found.update(fresh)
    return {n: found[n] for n in names}


# ----------------------------------------------------------------------------------------------------------
# 4. Cards


def feature_key(dictionary: str, feature: int) -> str:
    return f"{dictionary}:{int(feature)}"


def logit_weights(suite, dictionary: str, features: list[int]) -> Float[Tensor, "feat d_vocab"]:
    """Step 4's logit weights: decoder rows (through ``W_O`` for attention SAEs; for a CLT the sum of its
    decoder vectors into every layer it writes), centred, through ``W_U``."""
    model = suite.model
    w = card_dictionary(suite, dictionary).resid_directions(model, features).to(model.W_U.dtype)
    # LayerNorm subtracts the mean over d_model before the unembedding: that part of a direction never reaches it.
    return (w - w.mean(-1, keepdim=True)) @ model.W_U.detach()


def _logit_list(tokenizer, values: Tensor, ids: Tensor) -> list[list[Any]]:
    return [[token_text(tokenizer, int(i)), round(float(v), 4)] for v, i in zip(values.tolist(), ids.tolist())]


def _contexts(tokenizer, stats: CardStats, f: int, rows: Tensor, config: CardConfig) -> list[dict[str, Any]]:
    out = []
    n_ctx = rows.shape[1]
    for v, r, p in zip(stats.top_values[f].tolist(), stats.top_rows[f].tolist(), stats.top_pos[f].tolist()):
        if r < 0 or v <= 0:
            continue
        start, end = max(1, p - config.before), min(n_ctx, p + config.after + 1)
        ids = rows[r, start:end].tolist()
        out.append(dict(tokens=[token_text(tokenizer, i) for i in ids], index=p - start, activation=round(v, 4)))
    return out


def _histogram(stats: CardStats, f: int) -> dict[str, list]:
    counts = stats.hist_counts[f]
    occupied = counts.nonzero()
    if len(occupied) == 0:
        return dict(edges=[], counts=[])
    last = int(occupied[-1])
    width = float(stats.hist_range[f]) / counts.shape[0]
    return dict(edges=[round(i * width, 6) for i in range(last + 2)], counts=counts[: last + 1].tolist())


def scorecard_numbers(card: Mapping[str, Any] | None) -> dict[str, float] | None:
    if not card:
        return None
    return {k: float(card[k]) for k in SCORECARD_FIELDS if isinstance(card.get(k), (int, float))} or None


def find_scorecards(dictionary: str, feature: int, folders: Iterable[Path]) -> dict[str, float] | None:
    """Scorecard numbers from a ``{dictionary}_f{feature}.scorecard.json`` written by the dashboards, if any."""
    for folder in folders:
        path = Path(folder) / f"{dictionary}_f{feature}.scorecard.json"
        if path.is_file():
            try:
                return scorecard_numbers(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as e:
                log.warning("ignoring the unreadable scorecard %s (%s)", path, e)
    return None


def build_feature_cards(suite, features: Iterable[tuple[str, int]], text: CardText | TokenSet,
                        cache_dir: Path | None = None, progress: bool = True, config: CardConfig = CardConfig(),
                        scorecard_dirs: Iterable[Path] = ()) -> dict[str, dict[str, Any]]:
    """Cards for ``features`` (``(dictionary name, feature index)`` pairs), keyed ``"mlp1:613"`` (steps 1-5).

    ``text`` is a :class:`CardText` (see :func:`card_text_source`) or ready token rows. Scorecard numbers are
    read from ``{dictionary}_f{feature}.scorecard.json`` in ``scorecard_dirs`` (what ``--dashboards`` writes);
    otherwise they are null. ``dashboard`` is null: the caller links it."""
    requests: dict[str, list[int]] = {}
    for name, feat in features:
        requests.setdefault(str(name), [])
        if int(feat) not in requests[str(name)]:
            requests[str(name)].append(int(feat))
    if not requests:
        return {}
    for name, feats in requests.items():  # bad names or indices fail before any long work
        check_features(card_dictionary(suite, name), name, feats)
    tokens = text if isinstance(text, TokenSet) else card_tokens(suite, text, config)
    description = dict(text=text.describe() if isinstance(text, CardText) else "token rows given by the caller")
    stats = dictionary_stats(suite, requests, tokens, config, cache_dir, progress, description)
    tokenizer = suite.model.tokenizer
    folders = [Path(p) for p in scorecard_dirs]
    cards: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, feats in requests.items():
            weights = logit_weights(suite, name, feats)
            k = min(config.n_logits, weights.shape[-1])
            top, bottom = weights.topk(k, dim=-1), weights.topk(k, dim=-1, largest=False)
            st = stats[name]
            cd = card_dictionary(suite, name)
            kind = f"cross-layer transcoder feature of layer {cd.layer}" if cd.clt else "feature"
            for j, f in enumerate(feats):
                density = int(st.n_active[f]) / max(st.n_tokens, 1)
                card = dict(
                    title=f"{name} {kind} {f} · active on {density:.3%} of {st.n_tokens:,} held-out tokens",
                    label="",
                    contexts=_contexts(tokenizer, st, f, tokens.rows, config),
                    top_logits=_logit_list(tokenizer, top.values[j], top.indices[j]),
                    bottom_logits=_logit_list(tokenizer, bottom.values[j], bottom.indices[j]),
                    histogram=_histogram(st, f),
                    scorecard=find_scorecards(name, f, folders),
                    dashboard=None,
                )
                card["label"] = auto_label(card)
                cards[feature_key(name, f)] = card
    return cards


def attach_dashboards(cards: dict[str, dict[str, Any]], links: Mapping[str, str], scorecard_dir: Path | None = None) -> None:
    """Fill each card's ``dashboard`` from ``links`` (``{node id or card key: href}``, as
    ``analysis.dashboards.write_circuit_dashboards`` returns) and its scorecard from ``scorecard_dir``."""
    for node, href in links.items():
        key = node.split("@", 1)[0]
        if key in cards:
            cards[key]["dashboard"] = href
            if scorecard_dir is not None and cards[key].get("scorecard") is None:
                name, feat = key.split(":")
                cards[key]["scorecard"] = find_scorecards(name, int(feat), [scorecard_dir])


# ----------------------------------------------------------------------------------------------------------
# 5. Labels


def _quote(text: str, limit: int = 12) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


def auto_label(card: Mapping[str, Any], n: int = 3, limit: int = 60) -> str:
    """``on "a" "b" → "x" "y"``: the distinct highlighted tokens of the top contexts (by activation) and the top
    logits, at most ``n`` of each, each quoted and cut to 12 characters; the label cut to ``limit``."""
    seen: list[str] = []
    for ctx in card.get("contexts", []):
        tok = ctx["tokens"][ctx["index"]]
        if tok not in seen:
            seen.append(tok)
        if len(seen) == n:
            break
    outs = [t for t, _ in card.get("top_logits", [])[:n]]
    left = "on " + " ".join(_quote(t) for t in seen) if seen else "inactive on held-out text"
    label = f"{left} → {' '.join(_quote(t) for t in outs)}" if outs else left
    return label if len(label) <= limit else label[: limit - 1] + "…"


def logit_labels(suite, features: Iterable[tuple[str, int]], n: int = 3) -> dict[str, str]:
    """Labels from the top logits alone (``→ "x" "y"``), for when no cards were built: no pass over text."""
    requests: dict[str, list[int]] = {}
    for name, feat in features:
        requests.setdefault(str(name), []).append(int(feat))
    out = {}
    with torch.no_grad():
        for name, feats in requests.items():
            feats = list(dict.fromkeys(feats))
            check_features(card_dictionary(suite, name), name, feats)
            top = logit_weights(suite, name, feats).topk(n, dim=-1).indices
            for f, ids in zip(feats, top.tolist()):
                out[feature_key(name, f)] = "→ " + " ".join(_quote(token_text(suite.model.tokenizer, i)) for i in ids)
    return out
