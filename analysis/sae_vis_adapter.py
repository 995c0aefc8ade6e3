"""The edge between this toolkit and sae-vis 0.3.7 (pinned ``<0.4``): everything sae-vis-specific lives here.

1. ``vis_view(sae, n_ctx)``: sae-vis reads ``sae.cfg.hook_name``, ``hook_layer``, ``context_size`` and
   ``prepend_bos``, which sae-lens 6 keeps under ``sae.cfg.metadata`` (and has no ``hook_layer``). The view is a
   shallow copy of the dictionary (same weights) whose config copy carries them. ``hook_name`` is where the
   dictionary *writes* (for a transcoder, ``blocks.L.hook_mlp_out``), because sae-vis maps a feature to the
   residual stream from that name (``hook_z`` through ``W_O``, ``mlp_out`` as is). An attention SAE's view
   also reshapes ``hook_z`` (heads concatenated), so that sae-lens's ``HookedSAETransformer`` can splice it in.
2. ``hooked_sae_transformer(model)``: the same weights in sae-lens's ``HookedSAETransformer``, which the plain
   sae-vis entry point (``SaeVisData.create``) needs; only the benchmark and the reference test use it.
3. ``page_html(...)``: sae-vis's page, made self-contained: the two ``<script src="https://...">`` tags that
   load d3 and plotly from a CDN are replaced by the vendored files in ``analysis/vendor/`` (see its README),
   inline, so pages render with no network.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from saes.dictionary import spec_of

log = logging.getLogger(__name__)

VENDOR = Path(__file__).resolve().parent / "vendor"
CDN_SCRIPTS = {
    "https://d3js.org/d3.v6.min.js": "d3-6.7.0.min.js",
    "https://cdn.plot.ly/plotly-latest.min.js": "plotly-basic-1.58.5.min.js",
}


def vis_view(sae, n_ctx: int, prepend_bos: bool = True):
    """A view of ``sae`` (sharing its parameters) with the config attributes sae-vis reads."""
    spec = spec_of(sae)
    view = copy.copy(sae)  # shares parameters and hook points; attributes set below stay on the view
    cfg = copy.copy(sae.cfg)
    cfg.hook_name = spec.hook_out
    cfg.hook_layer = spec.layer
    cfg.hook_head_index = None
    cfg.context_size = n_ctx
    cfg.prepend_bos = prepend_bos
    view.cfg = cfg
    if spec.hook_out.endswith("hook_z"):
        cfg.reshape_activations = "hook_z"
        view.turn_on_forward_pass_hook_z_reshaping()
    return view


def hooked_sae_transformer(model):
    """``model``'s weights in a ``HookedSAETransformer`` (a copy; for sae-vis's plain entry point only)."""
    from sae_lens import HookedSAETransformer

    device = next(model.parameters()).device
    out = HookedSAETransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False)
    out.load_state_dict(model.state_dict(), strict=True)
    return out.to(device).eval()


def vocab_dict(tokenizer) -> dict[str, dict[int, str]]:
    """sae-vis's vocabulary tables (token id -> token string as the tokenizer stores it)."""
    vocab = {i: s for s, i in tokenizer.get_vocab().items()}
    return {k: vocab for k in ("embed", "unembed", "probes")}


@lru_cache(maxsize=None)
def _vendored(name: str) -> str:
    path = VENDOR / name
    if not path.is_file():
        raise FileNotFoundError(f"vendored script {path} is missing; restore analysis/vendor/ from the repository")
    return path.read_text(encoding="utf-8")


def inline_scripts(html: str) -> str:
    """Replace every CDN ``<script src>`` sae-vis writes with the vendored file, inline; refuse any other."""
    for url, name in CDN_SCRIPTS.items():
        tag = f'<script src="{url}"></script>'
        html = html.replace(tag, f"<script>/* {name}, inlined from analysis/vendor */\n{_vendored(name)}\n</script>")
    left = re.findall(r"<script[^>]*\bsrc=", html)
    if left:
        raise RuntimeError(f"sae-vis wrote {len(left)} script tag(s) with src= that are not vendored; add them to CDN_SCRIPTS")
    return html


def component_data(vis_data, layout, features: list[int]) -> dict[str, Any]:
    """The per-feature JSON sae-vis embeds in a page, for ``features`` only (as ``save_feature_centric_vis``)."""
    return {
        str(f): {name: vis_data.feature_data_dict[f][name].data(layout=layout, decode_fn=vis_data.decode_fn) for name in layout.components}
        for f in features
    }


def page_html(vis_data, layout, start_key: str, data: dict[str, Any], prompt_data: dict[str, Any] | None = None,
              title: str = "feature dashboard", before: str = "", head: str = "") -> str:
    """A complete, self-contained HTML document: ``before`` (e.g. a scorecard) beside sae-vis's dashboard."""
    body = vis_data._create_html_file(layout, start_key, data, prompt_data or {})  # sae-vis 0.3.7's page builder
    body = inline_scripts(body)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{_escape(title)}</title>{head}</head>\n<body>\n"
        "<div style='display:flex;align-items:flex-start;gap:16px'>\n"
        f"{before}\n<div class='sae-vis-dashboard' style='flex:1 1 auto;min-width:0'>\n{body}\n</div>\n</div>\n"
        "</body></html>\n"
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def json_for_script(obj: Any) -> str:
    """JSON safe to place inside a <script> element."""
    return json.dumps(obj).replace("</", "<\\/")
