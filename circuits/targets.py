"""Targets: what a circuit explains, how each reads the residual stream, and the compact text form for the CLI.

1. A target is a scalar of the clean pass: a dictionary feature's pre-activation at a position
   (:class:`FeatureTarget`), a logit or a logit difference (:class:`LogitTarget`), a pre-softmax attention
   score (:class:`AttentionScoreTarget`), or a direction at a hook (:class:`DirectionTarget`).
2. Each target knows its *read stage* (which residual writes it can see, see ``linear_model``), its latest
   position, its clean value (from the real model's cache, not the linearised model) and how to *read* it
   from a residual stream of the linearised model: an affine function, so that its gradient is the target's
   reading vector and its value at a zero residual is its bias constant.
3. The attention score is bilinear in the residual; its reader is the symmetric linearisation
   ``(q(r) . k_clean + q_clean . k(r)) / (2 sqrt(d_head))``, which equals the score at the clean point and
   splits it evenly between the query and the key side (the exact pair decomposition is ``circuits.qk``).

Text form (positions may be negative, counted from the end; ``@P`` defaults to the last position):

    mlp2:417@12           transcoder feature 417 of layer 2 at position 12
    attn1:55@-1           attention-SAE feature 55 of layer 1 at the last position
    logit:" import"       the logit of the token " import" at the last position (JSON string quoting)
    logit:" import"-" from"@7   a logit difference at position 7;  logit:#123 names a token by id
    attn1.3:12->4         the attention score of layer 1, head 3, from query position 12 to key position 4
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from circuits.linear_model import attn_stage, mlp_stage
from circuits.sites import Site, dictionary_name
from saes.suite import flatten_z

if TYPE_CHECKING:
    from circuits.linear_model import LinearisedModel


@dataclass(frozen=True)
class FeatureTarget:
    """Pre-activation of one dictionary feature; ``head`` restricts an attention feature's read to one head."""

    kind: str  # "attn_feature" | "mlp_feature"
    layer: int
    feature: int
    pos: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("attn_feature", "mlp_feature"):
            raise ValueError(f"kind must be 'attn_feature' or 'mlp_feature', got {self.kind!r}")

    @property
    def spec(self) -> str:
        return f"{dictionary_name(self.kind, self.layer)}:{self.feature}@{self.pos}"

    def stage(self, lm: "LinearisedModel") -> int:
        return attn_stage(self.layer) if self.kind == "attn_feature" else mlp_stage(self.layer)

    @property
    def max_pos(self) -> int:
        return self.pos

    def clean_value(self, lm: "LinearisedModel") -> float:
        sae = lm.dictionary(self.kind, self.layer)
        hook = f"blocks.{self.layer}.attn.hook_z" if self.kind == "attn_feature" else f"blocks.{self.layer}.ln2.hook_normalized"
        x = lm.cache[hook][self.pos]
        x = flatten_z(x) if self.kind == "attn_feature" else x
        return float(x.to(sae.W_enc.dtype) @ sae.W_enc[:, self.feature] + sae.b_enc[self.feature])


@dataclass(frozen=True)
class LogitTarget:
    """``sum_i coefficients[i] * logit[pos, tokens[i]]``: a logit (one token) or a logit difference."""

    tokens: tuple[int, ...]
    coefficients: tuple[float, ...]
    pos: int
    label: str = ""

    @property
    def spec(self) -> str:
        return self.label or "logit:" + "".join(f"{'+' if c > 0 else '-'}#{t}" for t, c in zip(self.tokens, self.coefficients))

    def stage(self, lm: "LinearisedModel") -> int:
        return lm.final_stage

    @property
    def max_pos(self) -> int:
        return self.pos

    def clean_value(self, lm: "LinearisedModel") -> float:
        return float(sum(c * lm.clean_logits[self.pos, t] for t, c in zip(self.tokens, self.coefficients)))

    def read(self, lm: "LinearisedModel", resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch"]:
        x = lm.ln(resid, lm.scale_final)[:, self.pos]
        coef = torch.tensor(self.coefficients, dtype=resid.dtype, device=resid.device)
        idx = torch.tensor(self.tokens, device=resid.device)
        return (x @ lm.model.W_U[:, idx] + lm.model.b_U[idx]) @ coef


@dataclass(frozen=True)
class AttentionScoreTarget:
    """The pre-softmax score of ``head`` at ``layer`` from ``query_pos`` to ``key_pos``."""

    layer: int
    head: int
    query_pos: int
    key_pos: int

    @property
    def spec(self) -> str:
        return f"attn{self.layer}.{self.head}:{self.query_pos}->{self.key_pos}"

    def stage(self, lm: "LinearisedModel") -> int:
        return attn_stage(self.layer)

    @property
    def max_pos(self) -> int:
        return self.query_pos

    def clean_value(self, lm: "LinearisedModel") -> float:
        return float(lm.cache[f"blocks.{self.layer}.attn.hook_attn_scores"][self.head, self.query_pos, self.key_pos])

    def q_k(self, lm: "LinearisedModel", resid: Float[Tensor, "batch pos d_model"]):
        """The query at ``query_pos`` and key at ``key_pos`` of this head, from a residual stream."""
        attn = lm.model.blocks[self.layer].attn
        x = lm.ln(resid, lm.scale_ln1[self.layer])
        q = x[:, self.query_pos] @ attn.W_Q[self.head] + attn.b_Q[self.head]
        k = x[:, self.key_pos] @ attn.W_K[self.head] + attn.b_K[self.head]
        return q, k

    def read(self, lm: "LinearisedModel", resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch"]:
        q_clean = lm.cache[f"blocks.{self.layer}.attn.hook_q"][self.query_pos, self.head]
        k_clean = lm.cache[f"blocks.{self.layer}.attn.hook_k"][self.key_pos, self.head]
        q, k = self.q_k(lm, resid)
        # Symmetric linearisation: gradient-times-input on both sides of the bilinear form would give 2S.
        return ((q * k_clean).sum(-1) + (q_clean * k).sum(-1)) / (2 * lm.cfg.attn_scale)


DIRECTION_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "ln1.hook_normalized",
                   "ln2.hook_normalized", "attn.hook_z", "ln_final.hook_normalized")


@dataclass(frozen=True)
class DirectionTarget:
    """``activation[hook][pos] . direction`` for a residual-stream, LayerNorm-output or ``hook_z`` hook."""

    hook: str
    pos: int
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.hook.endswith(DIRECTION_HOOKS):
            raise ValueError(f"direction targets are supported at hooks ending in {DIRECTION_HOOKS}, got {self.hook!r}")

    @property
    def spec(self) -> str:
        return f"dir:{self.hook}@{self.pos}"

    @property
    def layer(self) -> int:
        return int(self.hook.split(".")[1]) if self.hook.startswith("blocks.") else -1

    def stage(self, lm: "LinearisedModel") -> int:
        h, layer = self.hook, self.layer
        if h.startswith("ln_final"):
            return lm.final_stage
        if h.endswith(("hook_resid_pre", "ln1.hook_normalized", "attn.hook_z")):
            return attn_stage(layer)
        if h.endswith(("hook_resid_mid", "ln2.hook_normalized")):
            return mlp_stage(layer)
        return mlp_stage(layer) + 1  # hook_resid_post

    @property
    def max_pos(self) -> int:
        return self.pos

    def _vector(self, like: Tensor) -> Tensor:
        return torch.tensor(self.direction, dtype=like.dtype, device=like.device)

    def clean_value(self, lm: "LinearisedModel") -> float:
        x = lm.cache[self.hook][self.pos]
        x = flatten_z(x) if self.hook.endswith("hook_z") else x
        return float(x @ self._vector(x))

    def read(self, lm: "LinearisedModel", resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch"]:
        h, layer = self.hook, self.layer
        if h.endswith("attn.hook_z"):
            x = lm.attn_z(layer, resid)
        elif h.endswith("ln1.hook_normalized"):
            x = lm.ln(resid, lm.scale_ln1[layer])
        elif h.endswith("ln2.hook_normalized"):
            x = lm.ln(resid, lm.scale_ln2[layer])
        elif h.startswith("ln_final"):
            x = lm.ln(resid, lm.scale_final)
        else:
            x = resid
        return x[:, self.pos] @ self._vector(x)


Target = FeatureTarget | LogitTarget | AttentionScoreTarget | DirectionTarget


def read_targets(lm: "LinearisedModel", targets: Sequence[Target],
                 resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch"]:
    """Row b of the result is target b read from row b of ``resid`` (features of one dictionary vectorised)."""
    if resid.shape[0] != len(targets):
        raise ValueError(f"{len(targets)} targets but a residual batch of {resid.shape[0]}")
    out = [None] * len(targets)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for b, t in enumerate(targets):
        if isinstance(t, FeatureTarget):
            groups[(t.kind, t.layer, t.head)].append(b)
        else:
            out[b] = t.read(lm, resid[b : b + 1])[0]
    for (kind, layer, head), rows in groups.items():
        rows_t = torch.tensor(rows, device=resid.device)
        sae = lm.dictionary(kind, layer)
        pos = torch.tensor([targets[b].pos for b in rows], device=resid.device)
        feat = torch.tensor([targets[b].feature for b in rows], device=resid.device)
        w = rearrange(sae.W_enc[:, feat], "i r -> r i")  # each row's encoder direction
        bias = sae.b_enc[feat] if head is None else torch.zeros_like(sae.b_enc[feat])  # b_enc belongs to no head
        r = resid[rows_t]
        if kind == "mlp_feature":
            x = r[torch.arange(len(rows), device=resid.device), pos]
            x = (x - x.mean(-1, keepdim=True)) / lm.scale_ln2[layer][pos][:, None]
            vals = (x * w).sum(-1) + bias
        else:
            # Contract the encoder direction into W_V first: pre = sum_{h,k} pattern[h,q,k] x[k] . (W_V[h] w_h)
            # + b_V terms, which never forms v or z at every position (a large saving for batched reads).
            attn = lm.model.blocks[layer].attn
            w_h = split_heads(lm, w, head)
            u = value_read_directions(lm, layer, w_h)
            pattern = rearrange(lm.patterns[layer][:, pos, :], "h r k -> r h k")
            x = lm.ln(r, lm.scale_ln1[layer])
            reads = einsum(x, u, "r k d, r h d -> r h k")
            vals = (reads * pattern).sum((1, 2)) + (pattern.sum(-1) * einsum(attn.b_V, w_h, "h e, r h e -> r h")).sum(-1) + bias
        for j, b in enumerate(rows):
            out[b] = vals[j]
    return torch.stack(out)


def split_heads(lm: "LinearisedModel", w: Float[Tensor, "rows d_in"],
                head: int | None = None) -> Float[Tensor, "rows n_heads d_head"]:
    """Encoder columns of attention features split by head; with ``head``, every other head's slice zeroed."""
    w_h = rearrange(w, "r (h e) -> r h e", h=lm.cfg.n_heads)
    if head is None:
        return w_h
    keep = torch.zeros(lm.cfg.n_heads, 1, dtype=w.dtype, device=w.device)
    keep[head] = 1
    return w_h * keep


def value_read_directions(lm: "LinearisedModel", layer: int,
                          w_h: Float[Tensor, "rows n_heads d_head"]) -> Float[Tensor, "rows n_heads d_model"]:
    """``W_V[h] w_h``: what an attention feature with encoder slices ``w_h`` reads from LN1's output through head h.

    The feature's pre-activation at query q is ``sum_{h,k} pattern[h, q, k] LN1(resid)[k] . u[h]`` plus bias terms,
    so its per-head reading vector at key position k is ``pattern[h, q, k] (u[h] - mean(u[h])) / scale1[k]``.
    """
    return einsum(lm.model.blocks[layer].attn.W_V, w_h, "h d e, r h e -> r h d")


# ---------------------------------------------------------------------------------------------- parsing
_FEATURE = re.compile(r"^(attn|mlp)(-?\d+):(-?\d+)(?:@(-?\d+))?$")
_SCORE = re.compile(r"^attn(-?\d+)\.(-?\d+):(-?\d+)->(-?\d+)$")
_LOGIT = re.compile(r'^logit:(?P<a>"(?:[^"\\]|\\.)*"|#\d+)(?:-(?P<b>"(?:[^"\\]|\\.)*"|#\d+))?(?:@(?P<pos>-?\d+))?$')

SYNTAX_HELP = ('target syntax: mlpL:F[@P] | attnL:F[@P] | logit:"tok"[-"tok"][@P] | logit:#id | attnL.H:Q->K '
               '(see docs/circuits.md)')


def _position(text: str | None, n_pos: int, what: str) -> int:
    if text is None:
        return n_pos - 1
    p = int(text)
    if not -n_pos <= p < n_pos:
        raise ValueError(f"{what} {p} is out of range: the prompt has {n_pos} tokens (with BOS), so use a position "
                         f"in 0..{n_pos - 1} (or -1..-{n_pos} counted from the end)")
    return p % n_pos


def _layer(text: str, n_layers: int) -> int:
    layer = int(text)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist: the model has {n_layers} layers, use 0..{n_layers - 1}")
    return layer


def _token(text: str, tokenizer, d_vocab: int) -> int:
    if text.startswith("#"):
        tok = int(text[1:])
        if not 0 <= tok < d_vocab:
            raise ValueError(f"token id {tok} is out of range: the vocabulary has {d_vocab} tokens, use #0..#{d_vocab - 1}")
        return tok
    s = json.loads(text)
    ids = tokenizer.encode(s, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{text} is not one token (it tokenises as {pieces!r}); choose a single token, e.g. "
                         f"logit:{json.dumps(pieces[0]) if pieces else chr(34) + chr(34)}, or name one by id as logit:#ID")
    return ids[0]


def parse_target(spec: str, suite, n_pos: int) -> Target:
    """Parse the text form (module docstring) against a suite and a prompt of ``n_pos`` tokens."""
    spec = spec.strip()
    cfg = suite.model.cfg
    if m := _FEATURE.match(spec):
        family, layer_s, feat_s, pos_s = m.groups()
        layer = _layer(layer_s, cfg.n_layers)
        sae = (suite.attn_saes if family == "attn" else suite.transcoders).get(layer)
        if family == "mlp" and getattr(suite, "clt", None) is not None:  # a cross-layer transcoder's layer
            sae = suite.clt
        if sae is None:
            raise ValueError(f"the suite has no {family} dictionary at layer {layer}; it has {', '.join(suite.dictionaries())}")
        feature, d_sae = int(feat_s), sae.cfg.d_sae
        if not 0 <= feature < d_sae:
            raise ValueError(f"feature {feature} is out of range for {family}{layer}, which has {d_sae} features: use 0..{d_sae - 1}")
        return FeatureTarget(Site(family, layer).feature_kind, layer, feature,
                             _position(pos_s, n_pos, "position"))
    if m := _SCORE.match(spec):
        layer = _layer(m.group(1), cfg.n_layers)
        head = int(m.group(2))
        if not 0 <= head < cfg.n_heads:
            raise ValueError(f"head {head} does not exist: layer {layer} has {cfg.n_heads} heads, use 0..{cfg.n_heads - 1}")
        q = _position(m.group(3), n_pos, "query position")
        k = _position(m.group(4), n_pos, "key position")
        if k > q:
            raise ValueError(f"key position {k} is after query position {q}: attention is causal, so use a key position <= {q}")
        return AttentionScoreTarget(layer, head, q, k)
    if m := _LOGIT.match(spec):
        tokens = [_token(m.group("a"), suite.model.tokenizer, cfg.d_vocab)]
        coefficients = [1.0]
        if m.group("b"):
            tokens.append(_token(m.group("b"), suite.model.tokenizer, cfg.d_vocab))
            coefficients.append(-1.0)
            if tokens[0] == tokens[1]:
                raise ValueError(f"{spec}: a logit difference of a token with itself is always 0; name two different tokens")
        return LogitTarget(tuple(tokens), tuple(coefficients), _position(m.group("pos"), n_pos, "position"), label=spec)
    raise ValueError(f"cannot parse target {spec!r}; {SYNTAX_HELP}")
