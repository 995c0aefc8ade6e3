"""Feature dashboards (sae-vis) with a scorecard beside each, for any dictionary of a suite, offline.

For each dictionary with requested features:
1. One forward pass over the token set (``scorecard.collect_activations``) gives, for all requested features
   at once, their activations, the final residual stream, their correlation with every feature of the same
   dictionary and with every MLP neuron. (sae-vis's own ``SaeVisData.create`` runs the model again for every
   batch of features and caches every attention pattern of an attention SAE's layer for every row.)
2. sae-vis's ``parse_feature_data`` turns those into its per-feature data (top and quantile examples, the
   activation and logit histograms, logit tables). For an attention SAE, the direct feature attribution of an
   example needs that layer's values and patterns: values are kept, and the few pattern rows sae-vis shows are
   computed from kept queries and keys (``PatternFromQK``) instead of caching every pattern of every row.
3. The scorecard of each feature (``analysis/scorecard.py``) is written as JSON and drawn beside its page.
4. Pages are self-contained (scripts inline, ``analysis/sae_vis_adapter.py``): they render with no network.

Prompt-centric pages (``write_prompt_dashboard``) use the same data for the features active on a prompt.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from analysis import sae_vis_adapter as adapter
from analysis.scorecard import (
    FeatureActivations, TokenClass, TokenSet, check_features, collect_activations, dictionary_input,
    heldout_token_set, scorecard, vocab_texts, write_scorecard,
)
from circuits.graph import Node
from circuits.sites import FEATURE_KINDS

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 50_000


class PatternFromQK:
    """Stands in for ``blocks.L.attn.hook_pattern`` in sae-vis's cache. sae-vis reads it only as
    ``[rows, :, dest]`` (the attention of each shown example's destination token), so instead of every pattern
    of every row (``rows x heads x pos x pos``) we keep queries and keys (``rows x pos x heads x d_head``) and
    compute those pattern rows with the model's own ``calculate_attention_scores`` and its causal mask."""

    def __init__(self, attn, q: Tensor, k: Tensor):
        self.attn, self.q, self.k = attn, q, k

    @torch.inference_mode()
    def __getitem__(self, index) -> Float[Tensor, "k n_heads src"]:
        rows, heads, dest = index
        if heads != slice(None):
            raise IndexError("PatternFromQK supports only [rows, :, dest], the form sae-vis uses")
        rows, dest = torch.as_tensor(rows).flatten(), torch.as_tensor(dest).flatten()
        param = next(self.attn.parameters())
        q = self.q[rows, dest][:, None].to(param.device)  # [k 1 n_heads d_head]
        k = self.k[rows].to(param.device)  # [k src n_heads d_head]
        scores = self.attn.calculate_attention_scores(q, k)[:, :, 0]  # [k n_heads src]
        src = torch.arange(k.shape[1], device=scores.device)
        scores = scores.masked_fill(src[None, None, :] > dest.to(scores.device)[:, None, None], float("-inf"))
        return scores.softmax(-1).float().cpu()


def pattern_from_qk_is_exact(model) -> bool:
    """Queries and keys give the pattern directly only for plain causal attention (no rotary, ALiBi, bias)."""
    cfg = model.cfg
    return cfg.positional_embedding_type in ("standard", "shortformer") and cfg.attention_dir == "causal"


@dataclass
class DictionaryDashboards:
    """sae-vis data, activations and scorecards of one dictionary's requested features."""

    dictionary: str
    vis_data: Any
    activations: FeatureActivations
    scorecards: dict[int, dict[str, Any]]


def check_dashboard_dictionaries(suite, names: Iterable[str]) -> None:
    """Refuse, in one line, dashboards of a cross-layer transcoder's features: sae-vis draws a dictionary with one
    encoder and one decoder at one hook, and a CLT feature writes into every later layer."""
    clt_names = [n for n in names if n.startswith("mlp") and getattr(suite, "clt", None) is not None
                 and n not in suite.dictionaries()]
    if clt_names:
        raise ValueError(f"no dashboards for {', '.join(clt_names)} of suite {suite.name!r}: they are cross-layer "
                         f"transcoder features, which sae-vis cannot draw; drop --dashboards (their feature cards "
                         f"are still written) or trace with --dictionaries attn")


def vis_config(features: list[int]):
    from sae_vis.data_config_classes import SaeVisConfig

    return SaeVisConfig(features=features, minibatch_size_features=max(1, len(features)))


def build_dictionary_dashboards(suite, dictionary: str, features: list[int], tokens: TokenSet,
                                token_classes: dict[int, TokenClass | None] | None = None,
                                texts: list[str] | None = None, progress: bool = False,
                                with_scorecards: bool = True, ablation_rows: int = 8) -> DictionaryDashboards:
    """Steps 1 to 3 of the module docstring for one dictionary (step 3 only ``with_scorecards``)."""
    from sae_vis.data_fetching_fns import parse_feature_data
    from sae_vis.model_fns import to_resid_dir
    from sae_vis.utils_fns import RollingCorrCoef

    model, sae = suite.model, suite.dictionary(dictionary)
    check_features(sae, dictionary, features)
    features = list(dict.fromkeys(features))
    view = adapter.vis_view(sae, n_ctx=tokens.rows.shape[1])
    cfg = vis_config(features)
    corr_sae = RollingCorrCoef(indices=features, with_self=True)

    def update(acts: Tensor, all_acts: Tensor) -> None:
        corr_sae.update(acts.float().cpu(), all_acts.float().cpu())

    layer = view.cfg.hook_layer
    resid_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    keep = [resid_hook]
    is_attn = view.cfg.hook_name.endswith("hook_z")
    if is_attn:
        if not pattern_from_qk_is_exact(model):
            raise NotImplementedError(f"direct feature attribution pages need standard causal attention; {model.cfg.positional_embedding_type} is not supported")
        keep += [f"blocks.{layer}.attn.hook_{x}" for x in "qkv"]
    fa = collect_activations(suite, dictionary, features, tokens, keep=tuple(keep), scorecard_stats=with_scorecards,
                             on_batch=update, progress=progress)
    cache: dict[str, Any] = {resid_hook: fa.kept[resid_hook], f"{view.cfg.hook_name}.hook_sae_acts_post": fa.acts}
    if is_attn:
        attn_hook = f"blocks.{layer}.attn"
        cache[f"{attn_hook}.hook_v"] = fa.kept[f"{attn_hook}.hook_v"]
        cache[f"{attn_hook}.hook_pattern"] = PatternFromQK(model.blocks[layer].attn, fa.kept[f"{attn_hook}.hook_q"], fa.kept[f"{attn_hook}.hook_k"])
    with torch.inference_mode():
        out_dir = sae.W_dec[features].detach()
        vis_data, _ = parse_feature_data(
            model=model, cfg=cfg, sae=view, sae_B=None, tokens=tokens.rows, feature_indices=features,
            feature_resid_dir=to_resid_dir(out_dir, view, model),
            feature_resid_dir_input=to_resid_dir(sae.W_enc.T[features].detach(), view, model, input=True),
            cache=cache, feature_out_dir=out_dir, corrcoef_neurons=None, corrcoef_sae=corr_sae,
            vocab_dict=adapter.vocab_dict(model.tokenizer),
        )
    texts = texts or vocab_texts(model.tokenizer, model.cfg.d_vocab)
    classes = token_classes or {}
    cards = {f: scorecard(suite, fa, f, classes.get(f), tokens, texts, ablation_rows=ablation_rows) for f in features} if with_scorecards else {}
    fa.kept.clear()  # the sae-vis data is built; free the largest tensors
    return DictionaryDashboards(dictionary, vis_data, fa, cards)


def feature_page_html(dd: DictionaryDashboards, feature: int, suite_name: str = "") -> str:
    layout = dd.vis_data.cfg.feature_centric_layout
    data = adapter.component_data(dd.vis_data, layout, [feature])
    card = dd.scorecards.get(feature)
    title = f"{suite_name} {dd.dictionary} feature {feature}".strip()
    return adapter.page_html(dd.vis_data, layout, str(feature), data, title=title,
                             before=scorecard_panel(card, title) if card else "")


def dictionary_page_html(dd: DictionaryDashboards, suite_name: str = "") -> str:
    """One page with every feature of ``dd`` behind sae-vis's feature dropdown (no scorecard panel)."""
    layout = dd.vis_data.cfg.feature_centric_layout
    feats = dd.activations.features
    data = adapter.component_data(dd.vis_data, layout, feats)
    return adapter.page_html(dd.vis_data, layout, str(feats[0]), data, title=f"{suite_name} {dd.dictionary}".strip())


def page_name(dictionary: str, feature: int) -> str:
    return f"{dictionary}_f{feature}.html"


def write_feature_dashboards(suite, requests: dict[str, list[int]], out_dir: Path, tokens: TokenSet | None = None,
                             n_tokens: int = DEFAULT_TOKENS,
                             token_classes: dict[tuple[str, int], TokenClass] | None = None,
                             progress: bool = False) -> dict[tuple[str, int], str]:
    """Write one self-contained page per requested feature (``{dictionary}_f{feature}.html``, its scorecard
    beside it and in ``{dictionary}_f{feature}.scorecard.json``); activations are computed once per
    dictionary. Returns ``{(dictionary, feature): path relative to out_dir}``."""
    pages, _ = _write_dashboards(suite, requests, Path(out_dir), tokens, n_tokens, token_classes, progress)
    return pages


def _write_dashboards(suite, requests, out_dir: Path, tokens, n_tokens, token_classes, progress, ablation_rows: int = 8):
    if not requests or not any(requests.values()):
        raise ValueError("no features requested; give at least one dictionary with feature indices")
    check_dashboard_dictionaries(suite, requests)
    for name, feats in requests.items():
        check_features(suite.dictionary(name), name, list(feats))  # fail before any long computation
    tokens = tokens if tokens is not None else heldout_token_set(suite.model, n_tokens)
    texts = vocab_texts(suite.model.tokenizer, suite.model.cfg.d_vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    pages: dict[tuple[str, int], str] = {}
    cards: dict[tuple[str, int], dict[str, Any]] = {}
    classes = token_classes or {}
    for name, feats in requests.items():
        feats = list(dict.fromkeys(int(f) for f in feats))
        log.info("dashboards for %s: %d features over %d tokens", name, len(feats), tokens.n_tokens)
        dd = build_dictionary_dashboards(suite, name, feats, tokens, {f: classes.get((name, f)) for f in feats}, texts, progress,
                                         ablation_rows=ablation_rows)
        for f in feats:
            rel = page_name(name, f)
            (out_dir / rel).write_text(feature_page_html(dd, f, suite.name), encoding="utf-8")
            write_scorecard(dd.scorecards[f], out_dir / rel.replace(".html", ".scorecard.json"))
            pages[(name, f)], cards[(name, f)] = rel, dd.scorecards[f]
    return pages, cards


# ----------------------------------------------------------------------------------------------------------
# Prompt-centric pages


@torch.inference_mode()
def prompt_feature_acts(suite, dictionary: str, prompt: str) -> tuple[Tensor, Float[Tensor, "pos d_sae"], Float[Tensor, "pos d_model"]]:
    from analysis.cards import card_dictionary

    model, sae = suite.model, card_dictionary(suite, dictionary)  # a CLT's layer too: only its encoder is used
    toks = suite.tokens(prompt)
    resid_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(toks.to(next(model.parameters()).device), names_filter=lambda n: n in (sae.hook_in, resid_hook))
    acts = sae.encode(dictionary_input(cache[sae.hook_in], sae.hook_in))[0]
    return toks.cpu(), acts.float().cpu(), cache[resid_hook][0].float().cpu()


def write_prompt_dashboard(suite, dictionary: str, prompt: str, out_path: Path, tokens: TokenSet | None = None,
                           n_tokens: int = DEFAULT_TOKENS, features: list[int] | None = None,
                           top_per_token: int = 5, max_features: int = 20, progress: bool = False) -> Path:
    """sae-vis's prompt-centric page: for each token of ``prompt``, the features of ``dictionary`` that matter
    most there (by activation, activation quantile, loss effect), each with its mini-dashboard."""
    from sae_vis.data_fetching_fns import parse_prompt_data
    from sae_vis.model_fns import to_resid_dir

    check_dashboard_dictionaries(suite, [dictionary])
    toks, acts, resid = prompt_feature_acts(suite, dictionary, prompt)
    if features is None:
        top = acts[1:].topk(min(top_per_token, acts.shape[-1]), dim=-1)
        ranked = [int(f) for v, f in sorted(zip(top.values.flatten().tolist(), top.indices.flatten().tolist()), reverse=True) if v > 0]
        features = list(dict.fromkeys(ranked))[:max_features]
        if not features:
            raise ValueError(f"no feature of {dictionary} fires on this prompt; try a longer prompt or another dictionary")
    tokens = tokens if tokens is not None else heldout_token_set(suite.model, n_tokens)
    dd = build_dictionary_dashboards(suite, dictionary, features, tokens, progress=progress, with_scorecards=False)
    vis_data, model, sae = dd.vis_data, suite.model, suite.dictionary(dictionary)
    view = adapter.vis_view(sae, n_ctx=tokens.rows.shape[1])
    # "|" separates metric and token in sae-vis's keys; a token containing it would break the dropdowns.
    str_toks = [t.replace("|", "│") for t in model.tokenizer.convert_ids_to_tokens(toks[0].tolist())]
    with torch.inference_mode():
        scores, prompt_data = parse_prompt_data(
            tokens=toks, str_toks=str_toks, sae_vis_data=vis_data, feat_acts=acts[:, features],
            feature_resid_dir=to_resid_dir(sae.W_dec[features].detach(), view, model).float().cpu(),
            resid_post=resid, model=model, feature_idx=features, num_top_features=10,
        )
    for f, pd in prompt_data.items():
        vis_data.feature_data_dict[f]["prompt"] = pd
    # Open on the first token after BOS that has active features (BOS itself is rarely interesting).
    start = next((k for k, v in scores.items() if v and not k.endswith(" (0)")), None) or next((k for k, v in scores.items() if v), None)
    if start is None:
        raise ValueError("no feature is active on any token of the prompt")
    layout = vis_data.cfg.prompt_centric_layout
    data = adapter.component_data(vis_data, layout, features)
    title = f"{suite.name} {dictionary}: {prompt[:60]}"
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(adapter.page_html(vis_data, layout, start, data, scores, title=title), encoding="utf-8")
    return out_path


# ----------------------------------------------------------------------------------------------------------
# HTML around the dashboards


def _fmt_logits(items: list[dict[str, Any]]) -> str:
    return "".join(
        f"<tr><td><code>{html.escape(repr(it['token']))}</code></td><td style='text-align:right'>{it['weight']:+.3f}</td></tr>"
        for it in items
    )


def scorecard_panel(card: dict[str, Any], title: str) -> str:
    """The scorecard as an HTML panel, drawn left of the dashboard."""
    rows = [
        ("token class", f"{html.escape(card['token_class'])} <span style='color:#888'>({card['claimed_by']})</span>"),
        ("specificity", f"{card['specificity']:.3f}"),
        ("sensitivity", f"{card['sensitivity']:.3f}"),
        ("max activation", f"{card['max_act']:.3f} (fires above {card['fire_threshold']:.3f})"),
        ("class tokens", f"{card['n_class_tokens']} of {card['n_tokens']}"),
        ("density", f"{card['density']:.4%}"),
        ("max |corr| with a neuron", f"{card['max_neuron_corr']:.3f}<br><code>{card['max_neuron']}</code>"),
        ("loss change when ablated", f"{card['ablation_delta_loss']:+.4f} nats ({card['ablation_positions']} positions)"),
    ]
    body = "".join(f"<tr><th style='text-align:left;padding-right:8px'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        "<aside class='scorecard' style='flex:0 0 300px;font:13px sans-serif;border:1px solid #ccc;border-radius:6px;"
        "padding:10px;background:#fafafa'>"
        f"<h3 style='margin:0 0 8px 0'>Scorecard</h3><div style='color:#555;margin-bottom:6px'>{html.escape(title)}</div>"
        f"<table>{body}</table>"
        "<h4 style='margin:10px 0 4px 0'>Top logits</h4>"
        f"<table>{_fmt_logits(card['top_logits'])}</table>"
        "<h4 style='margin:10px 0 4px 0'>Bottom logits</h4>"
        f"<table>{_fmt_logits(card['bottom_logits'])}</table>"
        "</aside>"
    )


def write_index(out_dir: Path, entries: list[dict[str, Any]], title: str) -> Path:
    """An index page linking each dashboard, with its headline numbers."""
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(str(e.get('token_class', '')))}</td>"
        f"<td><a href='{html.escape(e['href'])}'>{html.escape(e['dictionary'])} #{e['feature']}</a></td>"
        f"<td>{e['specificity']:.3f}</td><td>{e['sensitivity']:.3f}</td><td>{e['max_neuron_corr']:.3f}</td>"
        f"<td>{e.get('ablation_delta_loss', float('nan')):+.4f}</td>"
        f"<td>{html.escape(', '.join(repr(t['token']) for t in e['top_logits'][:5]))}</td>"
        f"<td>{html.escape(', '.join(repr(t['token']) for t in e['bottom_logits'][:5]))}</td>"
        "</tr>"
        for e in entries
    )
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body style='font:14px sans-serif'>"
        f"<h2>{html.escape(title)}</h2><table border='1' cellpadding='4' style='border-collapse:collapse'>"
        "<tr><th>token class</th><th>dashboard</th><th>specificity</th><th>sensitivity</th>"
        "<th>max |corr| neuron</th><th>loss change ablated</th><th>top logits</th><th>bottom logits</th></tr>"
        f"{rows}</table></body></html>\n"
    )
    path = Path(out_dir) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# Circuit pages link to dashboards


def circuit_feature_requests(nodes: Iterable[Node]) -> dict[str, list[int]]:
    """``{dictionary: [features]}`` for the feature nodes of a circuit, in order of first appearance."""
    requests: dict[str, list[int]] = {}
    for n in nodes:
        if n.kind in FEATURE_KINDS:
            feats = requests.setdefault(n.dictionary, [])
            if n.feature not in feats:
                feats.append(n.feature)
    return requests


def write_circuit_dashboards(suite, nodes: Iterable[Node], out_dir: Path, subdir: str = "dashboards",
                             tokens: TokenSet | None = None, n_tokens: int = DEFAULT_TOKENS, progress: bool = False) -> dict[str, str]:
    """A dashboard for every feature node, in ``out_dir/subdir``; returns ``{node id: link relative to out_dir}``."""
    nodes = list(nodes)
    requests = circuit_feature_requests(nodes)
    if not requests:
        return {}
    pages = write_feature_dashboards(suite, requests, Path(out_dir) / subdir, tokens=tokens, n_tokens=n_tokens, progress=progress)
    return {n.id: f"{subdir}/{pages[(n.dictionary, n.feature)]}" for n in nodes if n.kind in FEATURE_KINDS}
