"""Linear probes for a token class: can the class be read linearly from a hook at all?

A reference point for the detector search. A dictionary feature reads its hook through one encoder direction and
a threshold, so a logistic probe on the same hook, scored as if it were a feature, shows roughly what the best
such direction can do. If the probe reaches the detector floors and no feature does, the model knows the class
and the dictionaries have not isolated it; if the probe cannot, no dictionary on that hook will.

1. For each hook in turn, a forward pass over the token set (stopped after the hook's block) keeping the
   activations of every token but each row's BOS, and the class mask (``analysis.scorecard.class_mask``). One
   hook at a time keeps memory at one hook's activations (GPT-2 small over 150,000 tokens: 0.5 GB, not 11 GB for
   all 24 dictionary inputs at once).
2. Split the tokens at random (seeded) into a fitting half and an evaluation half.
3. Fit a logistic regression of the class on the standardised activations of the fitting half (L-BFGS, a small
   L2 penalty).
4. On the evaluation half, score the probe as a feature, ``ReLU(logit + shift)`` for each shift, with the
   scorecard's own specificity and sensitivity (``analysis.scorecard.class_scores``); a larger shift lets the
   probe fire more widely (more sensitive, less specific).

A second reference, for a class narrowed by what follows it (the full stop): the model's own prediction
(``model_prediction_reference``). On each token of the class's texts, the probability the model gives that the
next token satisfies the class's context rule, kept where it is above a threshold, scored as a feature over all
the tokens (nothing is fitted). It shows what the model itself knows at its output about a class that is defined
by a token it has not yet seen.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analysis.scorecard import TokenClass, TokenSet, class_mask, class_scores, vocab_texts

SHIFTS = (0.0, 1.0, 2.0, 4.0)
PREDICTION_THRESHOLDS = (0.0, 0.3, 0.5, 0.7)
LOGIT_BYTES = 2**28  # the most logits (in bytes) one batch of the prediction reference holds


@dataclass(frozen=True)
class ProbeConfig:
    l2: float = 1e-4  # penalty on the squared weights (standardised inputs)
    max_iter: int = 300  # L-BFGS iterations
    shifts: tuple[float, ...] = SHIFTS
    seed: int = 0  # the fitting / evaluation split
    batch_rows: int = 32


@dataclass
class ProbeResult:
    hook: str
    n_fit: int
    n_eval: int
    n_class_eval: int
    accuracy: float  # of the sign of the logit, on the evaluation half
    by_shift: list[dict[str, float]] = field(default_factory=list)  # shift, specificity, sensitivity

    @property
    def best(self) -> dict[str, float]:
        """The shift with the largest min(specificity, sensitivity), the detector search's ranking."""
        return max(self.by_shift, key=lambda r: (min(r["specificity"], r["sensitivity"]), r["specificity"]))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "best": self.best}


def check_hooks(model, hooks: list[str]) -> None:
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"unknown hook(s) {missing}; use TransformerLens hook names such as 'blocks.2.ln2.hook_normalized'")


@torch.inference_mode()
def collect_hook(model, hook: str, tokens: TokenSet, batch_rows: int = 32) -> Float[Tensor, "n d"]:
    """Step 1: the activations at ``hook`` of every token but each row's BOS, flattened to one row a token."""
    check_hooks(model, [hook])
    device = next(model.parameters()).device
    parts = hook.split(".")
    stop = int(parts[1]) + 1 if parts[0] == "blocks" else None  # no need to run the blocks after the hook's
    out = []
    for start in range(0, tokens.rows.shape[0], batch_rows):
        _, cache = model.run_with_cache(tokens.rows[start : start + batch_rows].to(device), names_filter=[hook],
                                        stop_at_layer=stop)
        out.append(cache[hook][:, 1:].flatten(0, 1).flatten(1).float().cpu())
    return torch.cat(out)


def fit_logistic(x: Float[Tensor, "n d"], y: Bool[Tensor, "n"], cfg: ProbeConfig = ProbeConfig()):
    """Step 3: weights and bias of a logistic regression on standardised ``x``; returns a function giving logits."""
    if not torch.isfinite(x).all():
        raise ValueError("the activations hold NaN or inf; check the model and its input")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = y.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=cfg.max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + cfg.l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda v: ((v - mean) / std) @ w + b


def probe_hooks(model, token_class: TokenClass, hooks: list[str], tokens: TokenSet,
                cfg: ProbeConfig = ProbeConfig()) -> list[ProbeResult]:
    """Steps 1-4 for each hook: the probe's accuracy and its specificity / sensitivity as a feature."""
    texts = vocab_texts(model.tokenizer, model.cfg.d_vocab)
    mask = class_mask(token_class, tokens, texts)[:, 1:].flatten()
    if int(mask.sum()) < 4:
        raise ValueError(f"token class {token_class.name!r} occurs {int(mask.sum())} times in the token set; "
                         "a probe needs more: use more tokens")
    check_hooks(model, hooks)
    n = mask.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    fit, ev = perm[: n // 2], perm[n // 2 :]
    results = []
    for hook in hooks:
        x = collect_hook(model, hook, tokens, cfg.batch_rows)
        logit = fit_logistic(x[fit], mask[fit], cfg)(x[ev])
        accuracy = float(((logit > 0) == mask[ev]).float().mean())
        rows = []
        for shift in cfg.shifts:
            sc = class_scores(torch.relu(logit + shift), mask[ev])
            rows.append({"shift": shift, "specificity": round(sc.specificity, 4), "sensitivity": round(sc.sensitivity, 4)})
        results.append(ProbeResult(hook, len(fit), len(ev), int(mask[ev].sum()), round(accuracy, 4), rows))
    return results


@torch.inference_mode()
def model_prediction_reference(model, token_class: TokenClass, tokens: TokenSet,
                               thresholds: tuple[float, ...] = PREDICTION_THRESHOLDS,
                               batch_rows: int = 32) -> dict[str, Any]:
    """The model's own next-token prediction scored as a feature of ``token_class``.

    1. The class's member tokens (by stripped text) and, for each, the tokens that may follow it for the context
       rule to hold (``class_mask``'s test: the member's trailing whitespace, then the next token's text; special
       tokens read as the end of the text).
    2. One forward pass over ``tokens``; at every member token, the softmax mass on those followers.
    3. For each threshold, that probability where it is above the threshold and 0 elsewhere, scored with the
       scorecard's specificity and sensitivity against the class mask.
    """
    if token_class.followed_by is None:
        raise ValueError(f"token class {token_class.name!r} has no context rule: the model's prediction is a reference "
                         "only for a class narrowed by what follows, such as the full stop '.'")
    texts = vocab_texts(model.tokenizer, model.cfg.d_vocab)
    mask = class_mask(token_class, tokens, texts)  # raises when no token of the vocabulary has the class's text
    rule = re.compile(token_class.followed_by)
    members = [i for i, t in enumerate(texts) if t.strip() in token_class.texts]
    # 1. followers per trailing whitespace (members with the same trailing whitespace share them)
    tails = {i: texts[i][len(texts[i].rstrip()):] for i in members}
    followers = {tail: torch.tensor([bool(rule.match(tail + t)) for t in texts]) for tail in set(tails.values())}
    device = next(model.parameters()).device
    is_member = torch.zeros(len(texts), dtype=torch.bool)
    is_member[members] = True
    # 2. the probability at each member token (BOS column excluded, as in every statistic)
    prob = torch.zeros(tokens.rows.shape, dtype=torch.float64)
    n_ctx, d_vocab = tokens.rows.shape[1], model.cfg.d_vocab
    rows_per_batch = max(1, min(batch_rows, LOGIT_BYTES // (4 * n_ctx * d_vocab)))
    for start in range(0, tokens.rows.shape[0], rows_per_batch):
        batch = tokens.rows[start : start + rows_per_batch]
        at = is_member[batch]
        at[:, 0] = False
        if not at.any():
            continue
        logits = model(batch.to(device))
        probs = logits[at.to(device)].float().softmax(-1).cpu()  # [n_at, d_vocab]
        ok = torch.stack([followers[tails[int(t)]] for t in batch[at]])
        prob[start : start + rows_per_batch][at] = (probs * ok).sum(-1).double()
    if not torch.isfinite(prob).all():
        raise ValueError("the model's logits hold NaN or inf; check the model and its input")
    # 3. scored as a feature at each threshold
    by_threshold = []
    for thr in thresholds:
        sc = class_scores(torch.where(prob > thr, prob, torch.zeros(())), mask)
        by_threshold.append({"threshold": thr, "specificity": round(sc.specificity, 4), "sensitivity": round(sc.sensitivity, 4)})
    at_members = is_member[tokens.rows]
    at_members[:, 0] = False
    accuracy = float(((prob[at_members] > 0.5) == mask[at_members]).double().mean())
    best = max(by_threshold, key=lambda r: (min(r["specificity"], r["sensitivity"]), r["specificity"]))
    return {"n_member_tokens": int(at_members.sum()), "n_class": int(mask.sum()), "accuracy_at_0.5": round(accuracy, 4),
            "by_threshold": by_threshold, "best": best}
