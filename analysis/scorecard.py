"""Interpretability scorecards: four numbers that answer, for one feature and one token class, the questions a
researcher asks of a dashboard by eye (docs/dashboards.md).

Over a held-out token set (every token of every row except the BOS that starts the row):
1. *Token class*: the token ids whose text, stripped of whitespace, is one of the class's texts (``import``
   covers ``import`` and `` import``), optionally narrowed by a context rule: a regular expression that must
   match the text that follows the stripped token (its own trailing whitespace, then the next token; ``""``
   at the end of the text). The full stop is ``.`` followed by whitespace, a quote or the end of the text, so
   attribute access (``os.path``) is not a full stop.
2. *Specificity*: the share of the feature's total activation that falls on tokens of the class.
3. *Sensitivity*: the share of the class's occurrences on which the feature fires above 10% of its maximum
   (its maximum over the same token set).
4. *Downstream*: the top positive and negative logit weights of the feature's decoder direction through the
   unembedding (for an attention SAE, through each head's ``W_O`` first, then summed over heads), and the
   change in next-token loss at the positions where it fires when its decoded contribution
   ``act * W_dec[f]`` is subtracted from the dictionary's output hook (the rest of the activation, including
   the dictionary's error, is kept).
5. *Not a neuron*: the largest absolute Pearson correlation, over the same tokens, between the feature's
   activation and any single MLP neuron (``blocks.L.mlp.hook_post``) of any layer.

All activations come from one forward pass per dictionary (:func:`collect_activations`); the dashboards reuse it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saes.dictionary import encode, spec_of
from saes.suite import flatten_z

log = logging.getLogger(__name__)

# What may follow a sentence-ending full stop: whitespace, a quote, or the end of the text.
SENTENCE_END = r"[\s\"'`“”‘’]|$"
FIRE_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------------------
# Token classes and the held-out token set


@dataclass(frozen=True)
class TokenClass:
    """A set of token ids given by their stripped text, optionally narrowed by what follows them."""

    name: str
    texts: tuple[str, ...]
    followed_by: str | None = None  # a regex matched (re.match) against the text after the stripped token

    def __post_init__(self) -> None:
        if not self.texts or any(not isinstance(t, str) or not t.strip() for t in self.texts):
            raise ValueError(f"token class {self.name!r} needs at least one non-blank text, got {self.texts!r}")
        if any(t != t.strip() for t in self.texts):
            raise ValueError(f"token class {self.name!r}: give texts stripped of whitespace, got {self.texts!r}")
        if self.followed_by is not None:
            try:
                re.compile(self.followed_by)
            except re.error as e:
                raise ValueError(f"token class {self.name!r}: followed_by is not a valid regex ({e})") from e

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FULL_STOP = TokenClass("full stop", (".",), followed_by=SENTENCE_END)
DEFAULT_CLASSES = (FULL_STOP, TokenClass("for", ("for",)), TokenClass("import", ("import",)))


def parse_token_class(text: str) -> TokenClass:
    """A class from a command-line word: ``.`` is the sentence-ending full stop, anything else its own text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("an empty token class was given; name a token such as '.', 'for' or 'import'")
    text = text.strip()
    return FULL_STOP if text == "." else TokenClass(text, (text,))


class TokenSet(NamedTuple):
    """Rows of tokens, each starting with BOS, and the token that follows each row in the text (for context
    rules at the last position; the end-of-text id where the text ends)."""

    rows: Int[Tensor, "row pos"]
    following: Int[Tensor, "row"]

    @property
    def n_tokens(self) -> int:
        """Tokens counted by every statistic: all but the BOS of each row."""
        return self.rows.shape[0] * (self.rows.shape[1] - 1)


def token_set_from_texts(model, texts: list[str], n_tokens: int | None = None, n_ctx: int | None = None) -> TokenSet:
    """Tokenise ``texts`` (joined by the end-of-text token) into rows of ``n_ctx`` tokens starting with BOS,
    stopping once ``n_tokens`` tokens (not counting BOS) are covered."""
    tok = model.tokenizer
    n_ctx = n_ctx or model.cfg.n_ctx
    eot = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else eot
    body = n_ctx - 1
    ids: list[int] = []
    for text in texts:
        ids.append(eot)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if n_tokens is not None and len(ids) > n_tokens + body:
            break
    n_rows = len(ids) // body
    if n_tokens is not None:
        n_rows = min(n_rows, max(1, -(-n_tokens // body)))
    if n_rows == 0:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one row of {n_ctx}; give more text")
    stream = torch.tensor(ids + [eot], dtype=torch.long)
    rows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), stream[: n_rows * body].view(n_rows, body)], 1)
    following = stream[body : (n_rows + 1) * body : body][:n_rows]
    return TokenSet(rows, following)


def heldout_token_set(model, n_tokens: int | None = None) -> TokenSet:
    """The held-out files of the mini corpus (``saes.corpus.split_files``), tokenised by ``model``'s tokenizer."""
    from saes.corpus import read_text, split_files

    _, heldout = split_files()
    if not heldout:
        raise FileNotFoundError("no held-out files found in this interpreter's standard library")
    return token_set_from_texts(model, (read_text(p) for p in heldout), n_tokens=n_tokens)  # type: ignore[arg-type]


def vocab_texts(tokenizer, d_vocab: int) -> list[str]:
    """The decoded text of every token id (special tokens decode to "")."""
    special = set(tokenizer.all_special_ids)
    n = min(d_vocab, len(tokenizer))
    texts = ["" if i in special else tokenizer.decode([i]) for i in range(n)]
    return texts + [""] * (d_vocab - n)


def class_mask(token_class: TokenClass, tokens: TokenSet, texts: list[str]) -> Bool[Tensor, "row pos"]:
    """Where ``tokens`` hold a member of ``token_class`` (never at the BOS position)."""
    members = [i for i, t in enumerate(texts) if t.strip() in token_class.texts]
    if not members:
        raise ValueError(f"no token of this vocabulary has the text {token_class.texts!r}; pick another token class")
    mask = torch.isin(tokens.rows, torch.tensor(members))
    mask[:, 0] = False
    if token_class.followed_by is None:
        return mask
    rule = re.compile(token_class.followed_by)
    n_pos = tokens.rows.shape[1]
    for r, p in mask.nonzero().tolist():
        text = texts[int(tokens.rows[r, p])]
        after = text[len(text.rstrip()) :]
        nxt = int(tokens.rows[r, p + 1]) if p + 1 < n_pos else int(tokens.following[r])
        if not rule.match(after + texts[nxt]):
            mask[r, p] = False
    return mask


# ----------------------------------------------------------------------------------------------------------
# One forward pass per dictionary


class RunningPearson:
    """Pearson correlations between every column of x and every column of y, accumulated over batches."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, Tensor] = {}

    def update(self, x: Float[Tensor, "n fx"], y: Float[Tensor, "n fy"]) -> None:
        x, y = x.double(), y.double()
        parts = dict(x=x.sum(0), y=y.sum(0), xx=(x * x).sum(0), yy=(y * y).sum(0), xy=x.T @ y)
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += x.shape[0]

    def pearson(self) -> Float[Tensor, "fx fy"]:
        s, n = self.sums, self.n
        cov = n * s["xy"] - torch.outer(s["x"], s["y"])
        var_x = (n * s["xx"] - s["x"] ** 2).clamp_min(0)
        var_y = (n * s["yy"] - s["y"] ** 2).clamp_min(0)
        denom = torch.outer(var_x, var_y).sqrt()
        # A constant feature or neuron has no correlation with anything: report 0, not NaN.
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


@dataclass
class FeatureActivations:
    """What one pass over a token set records for a dictionary's requested features."""

    dictionary: str
    features: list[int]
    acts: Float[Tensor, "row pos feat"]
    d_mlp: int
    neuron_corr: Float[Tensor, "feat neuron"] | None = None  # Pearson with every MLP neuron, layers concatenated
    clean_loss: Float[Tensor, "row pos_minus_1"] | None = None  # next-token loss of the unmodified model
    kept: dict[str, Tensor] = field(default_factory=dict)  # other activations asked for, by hook name


def dictionary_input(cache_value: Tensor, hook_name: str) -> Tensor:
    return flatten_z(cache_value) if hook_name.endswith("hook_z") else cache_value


@torch.inference_mode()
def collect_activations(suite, dictionary: str, features: list[int], tokens: TokenSet, batch_rows: int = 32,
                        keep: tuple[str, ...] = (), scorecard_stats: bool = True,
                        on_batch: Callable[[Tensor, Tensor], None] | None = None,
                        progress: bool = False) -> FeatureActivations:
    """Run the model once over ``tokens``; encode with ``dictionary``; keep the requested features' activations
    and the activations at the hooks named in ``keep`` (float32, on the CPU). With ``scorecard_stats``, also
    the features' Pearson correlation with every MLP neuron (non-BOS tokens) and the clean next-token loss;
    without, the pass stops before the unembedding. ``on_batch(requested_acts, all_acts)`` sees every batch."""
    from tqdm.auto import tqdm

    model, sae = suite.model, suite.dictionary(dictionary)
    spec = spec_of(sae)
    check_features(sae, dictionary, features)
    cfg = model.cfg
    device = next(model.parameters()).device
    post_hooks = [f"blocks.{l}.mlp.hook_post" for l in range(cfg.n_layers)] if scorecard_stats else []
    names = {spec.hook_in, *keep, *post_hooks}
    idx = torch.tensor(features, device=sae.W_enc.device)
    loss_out, corr = [], RunningPearson()
    n_rows = tokens.rows.shape[0]
    # Outputs are filled in place (not concatenated at the end), so the peak holds one copy of each.
    store: dict[str, Tensor] = {}

    def put(name: str, start: int, value: Tensor) -> None:
        if name not in store:
            store[name] = torch.empty((n_rows, *value.shape[1:]), dtype=torch.float32)
        store[name][start : start + value.shape[0]] = value

    for start in tqdm(range(0, n_rows, batch_rows), desc=f"activations {dictionary}", disable=not progress):
        batch = tokens.rows[start : start + batch_rows]
        toks = batch.to(device)
        logits, cache = model.run_with_cache(toks, names_filter=lambda n: n in names,
                                             stop_at_layer=None if scorecard_stats else cfg.n_layers)
        all_acts = encode(sae, dictionary_input(cache[spec.hook_in], spec.hook_in))
        acts = all_acts[..., idx]
        if on_batch is not None:
            on_batch(acts, all_acts)
        if scorecard_stats:
            loss_out.append(next_token_loss(logits, toks).float().cpu())
            neurons = torch.cat([cache[h] for h in post_hooks], dim=-1)
            corr.update(acts[:, 1:].flatten(0, 1), neurons[:, 1:].flatten(0, 1))
        put("acts", start, acts)
        for h in keep:
            put(h, start, cache[h])
        del cache, logits
    acts_all = store.pop("acts")
    return FeatureActivations(
        dictionary=dictionary, features=list(features), acts=acts_all, d_mlp=cfg.d_mlp,
        neuron_corr=corr.pearson().float() if scorecard_stats else None,
        clean_loss=torch.cat(loss_out) if scorecard_stats else None,
        kept=store,
    )


def next_token_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Tensor) -> Float[Tensor, "batch pos_minus_1"]:
    logprobs = logits[:, :-1].float().log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def check_features(sae, dictionary: str, features: list[int]) -> None:
    d_sae = sae.cfg.d_sae
    if not features:
        raise ValueError(f"no features given for {dictionary}; pass feature indices such as --features 3,17")
    bad = [f for f in features if not isinstance(f, int) or not 0 <= f < d_sae]
    if bad:
        raise IndexError(f"feature index {bad[0]} is out of range for {dictionary}, which has {d_sae} features (0..{d_sae - 1})")


# ----------------------------------------------------------------------------------------------------------
# The four numbers


class ClassScores(NamedTuple):
    specificity: float
    sensitivity: float
    max_act: float
    n_class: int
    n_fired_on_class: int


def class_scores(acts: Float[Tensor, "..."], mask: Bool[Tensor, "..."], fire_fraction: float = FIRE_FRACTION) -> ClassScores:
    """Specificity and sensitivity of one feature's activations against one class mask (same shape)."""
    acts, mask = acts.flatten().double(), mask.flatten()
    n_class = int(mask.sum())
    if n_class == 0:
        raise ValueError("the token class never occurs in this token set; use more tokens or another class")
    total = float(acts.sum())
    max_act = float(acts.max())
    specificity = float(acts[mask].sum()) / total if total > 0 else 0.0
    fired = int((acts[mask] > fire_fraction * max_act).sum()) if max_act > 0 else 0
    return ClassScores(specificity, fired / n_class, max_act, n_class, fired)


def decoder_logit_weights(suite, dictionary: str, feature: int) -> Float[Tensor, "d_vocab"]:
    """The feature's decoder direction written into the residual stream, read through the unembedding."""
    model, sae = suite.model, suite.dictionary(dictionary)
    spec = spec_of(sae)
    w = sae.W_dec[feature].detach()
    if spec.hook_out.endswith("hook_z"):
        n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
        # Each head's slice of the z direction goes through that head's W_O; heads then add in the residual.
        w = torch.einsum("hd,hdm->m", w.view(n_heads, d_head), model.W_O[spec.layer].detach())
    return w.to(model.W_U.dtype) @ model.W_U.detach()


def top_logits(suite, weights: Tensor, k: int = 10, largest: bool = True) -> list[dict[str, Any]]:
    vals, ids = weights.topk(k, largest=largest)
    return [{"token": token_text(suite.model.tokenizer, i), "id": int(i), "weight": round(float(v), 4)} for v, i in zip(vals.tolist(), ids.tolist())]


def token_text(tokenizer, token_id: int) -> str:
    """A token's text; a token that is part of a multi-byte character shows as its raw vocabulary string."""
    text = tokenizer.decode([token_id])
    return text if "\ufffd" not in text else tokenizer.convert_ids_to_tokens(token_id)


@torch.inference_mode()
def ablation_delta_loss(suite, dictionary: str, feature: int, tokens: TokenSet, acts: Float[Tensor, "row pos"],
                        clean_loss: Float[Tensor, "row pos_minus_1"], max_rows: int = 16, batch_rows: int = 16) -> tuple[float, int]:
    """Mean change in next-token loss at the positions where the feature fires when ``act * W_dec[f]`` is taken
    out of the dictionary's output hook there (``clean_loss`` is the unmodified model's, from the same pass as
    ``acts``). Uses the first ``max_rows`` rows in which it fires. Returns (mean change, positions measured)."""
    model, sae = suite.model, suite.dictionary(dictionary)
    spec = spec_of(sae)
    device = next(model.parameters()).device
    fires = acts > 0
    fires[:, -1] = False  # the last position has no next token in its row
    fires[:, 0] = False
    rows = fires.any(1).nonzero().flatten()[:max_rows]
    if len(rows) == 0:
        return 0.0, 0
    w_dec = sae.W_dec[feature].detach()
    deltas = []
    for chunk in rows.split(batch_rows):
        # Attention is causal: the loss up to the last firing position depends on no later token.
        end = int(fires[chunk].nonzero()[:, 1].max()) + 2
        toks = tokens.rows[chunk, :end].to(device)
        a = acts[chunk, :end].to(device=device, dtype=w_dec.dtype)
        where = fires[chunk, :end].to(device)

        def subtract(value: Tensor, hook) -> Tensor:
            delta = a[..., None] * w_dec  # [batch pos d_out]
            if value.ndim == 4:  # hook_z: [batch pos n_heads d_head]
                delta = delta.view(*value.shape)
            return value - delta.to(value.dtype)

        logits = model.run_with_hooks(toks, fwd_hooks=[(spec.hook_out, subtract)])
        ablated = next_token_loss(logits, toks).cpu()
        deltas.append((ablated - clean_loss[chunk, : end - 1])[where[:, :-1].cpu()])
    d = torch.cat(deltas)
    return float(d.mean()), int(d.numel())


def max_neuron(neuron_corr_row: Tensor, d_mlp: int) -> tuple[float, str]:
    """The largest |Pearson| with a single MLP neuron, and that neuron's address."""
    i = int(neuron_corr_row.abs().argmax())
    return float(neuron_corr_row[i].abs()), f"blocks.{i // d_mlp}.mlp.hook_post[{i % d_mlp}]"


def claimed_class(suite, acts: Float[Tensor, "row pos"], tokens: TokenSet, texts: list[str]) -> TokenClass:
    """For a feature shown without a claim: the stripped token text that receives most of its activation."""
    by_text: dict[str, float] = {}
    a = acts[:, 1:].flatten()
    ids = tokens.rows[:, 1:].flatten()
    nz = a > 0
    for i, v in zip(ids[nz].tolist(), a[nz].tolist()):
        t = texts[i].strip()
        if t:
            by_text[t] = by_text.get(t, 0.0) + v
    if not by_text:
        raise ValueError("the feature never fires on this token set; show it with more tokens or pick another feature")
    best = max(by_text, key=by_text.__getitem__)
    return FULL_STOP if best == "." else TokenClass(best, (best,))


def scorecard(suite, fa: FeatureActivations, feature: int, token_class: TokenClass | None, tokens: TokenSet,
              texts: list[str] | None = None, k_logits: int = 10, ablation_rows: int = 16) -> dict[str, Any]:
    """The scorecard of one feature of ``fa`` as a JSON-ready dict. Without a token class, the class is the
    token text that receives most of its activation (``claimed_by``: "top token")."""
    if fa.neuron_corr is None or fa.clean_loss is None:
        raise ValueError("these activations were collected without scorecard_stats; collect them with scorecard_stats=True")
    texts = texts or vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab)
    j = fa.features.index(feature)
    acts = fa.acts[..., j]
    body = acts[:, 1:]
    claimed_by = "given"
    if token_class is None and not (body > 0).any():
        # A feature that never fires here claims nothing; its card says so rather than failing the whole page set.
        token_class, claimed_by = None, "never fires on these tokens"
        scores = ClassScores(0.0, 0.0, 0.0, 0, 0)
    else:
        if token_class is None:
            token_class, claimed_by = claimed_class(suite, acts, tokens, texts), "top token"
        scores = class_scores(body, class_mask(token_class, tokens, texts)[:, 1:])
    weights = decoder_logit_weights(suite, fa.dictionary, feature)
    corr, neuron = max_neuron(fa.neuron_corr[j], fa.d_mlp)
    delta, n_ablated = ablation_delta_loss(suite, fa.dictionary, feature, tokens, acts, fa.clean_loss, max_rows=ablation_rows)
    return {
        "token_class": token_class.name if token_class else "", "token_class_rule": token_class.to_json() if token_class else None,
        "claimed_by": claimed_by,
        "dictionary": fa.dictionary, "feature": feature,
        "specificity": round(scores.specificity, 4), "sensitivity": round(scores.sensitivity, 4),
        "max_act": round(scores.max_act, 4), "fire_threshold": round(FIRE_FRACTION * scores.max_act, 4),
        "n_class_tokens": scores.n_class, "n_tokens": tokens.n_tokens,
        "density": round(float((body > 0).double().mean()), 6),
        "max_neuron_corr": round(corr, 4), "max_neuron": neuron,
        "top_logits": top_logits(suite, weights, k_logits), "bottom_logits": top_logits(suite, weights, k_logits, largest=False),
        "ablation_delta_loss": round(delta, 5), "ablation_positions": n_ablated, "ablation_rows": ablation_rows,
    }


def write_scorecard(card: dict[str, Any], path: Path) -> None:
    from saes.io import atomic_write_json

    atomic_write_json(Path(path), card)
