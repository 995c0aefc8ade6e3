"""A suite: one model and its dictionaries (an attention-output SAE and an MLP transcoder per layer).

``load_suite("mini")`` loads the embedded suite shipped in ``saes/mini`` (no network);
``load_suite("gpt2-small")`` loads GPT-2 small with the Kissane et al. attention SAEs and the Dunefsky et al.
transcoders through the Hugging Face hub (``saes/pretrained.py``).

Dictionaries are named ``attn{L}`` and ``mlp{L}``; every place is addressed by its TransformerLens hook name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from saes.dictionary import spec_of

log = logging.getLogger(__name__)

MINI_DIR = Path(__file__).resolve().parent / "mini"
KNOWN_SUITES = ("mini", "gpt2-small", "mini-skip", "mini-clt", "gpt2-small-clt")
# Named suites beyond the two above: name -> "module:function(device=..., path=...)".
NAMED_SUITES = {
    "mini-skip": "saes.mini_suite:load_mini_skip",
    "mini-clt": "saes.mini_suite:load_mini_clt",
    "gpt2-small-clt": "saes.pretrained:load_gpt2_small_clt_suite",
}


@dataclass
class Suite:
    """A model with an attention SAE and a transcoder per layer. ``info`` holds what the suite says of itself."""

    name: str
    model: Any
    attn_saes: dict[int, Any]
    transcoders: dict[int, Any]
    info: dict[str, Any] = field(default_factory=dict)
    clt: Any = None  # an optional saes.clt.CrossLayerTranscoder over every MLP layer

    def __post_init__(self) -> None:
        for sae in [*self.attn_saes.values(), *self.transcoders.values()]:
            check_fits(self.model, sae)
        if self.clt is not None:
            check_clt_fits(self.model, self.clt)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def dictionaries(self) -> dict[str, Any]:
        """All dictionaries by name, in the order of the forward pass: attn0, mlp0, attn1, mlp1, ..."""
        out: dict[str, Any] = {}
        for layer in range(self.n_layers):
            if layer in self.attn_saes:
                out[f"attn{layer}"] = self.attn_saes[layer]
            if layer in self.transcoders:
                out[f"mlp{layer}"] = self.transcoders[layer]
        return out

    def dictionary(self, name: str):
        found = self.dictionaries()
        if name not in found:
            raise KeyError(f"suite {self.name!r} has no dictionary {name!r}; it has: {', '.join(found)}")
        return found[name]

    def to(self, device: str | torch.device) -> "Suite":
        self.model.to(device, print_details=False)
        for sae in [*self.attn_saes.values(), *self.transcoders.values()]:
            sae.to(device)
        if self.clt is not None:
            self.clt.to(device)
        return self

    def tokens(self, prompt: str, max_len: int | None = None) -> Float[Tensor, "1 pos"]:
        """Tokenise a prompt with BOS, refusing empty or too-long prompts with a clear error."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; give some text to run the model on")
        toks = self.model.to_tokens(prompt, prepend_bos=True, truncate=False)
        limit = max_len or self.model.cfg.n_ctx
        if toks.shape[1] > limit:
            raise ValueError(f"the prompt is {toks.shape[1]} tokens with BOS, more than this model's context of {limit}; shorten it")
        return toks


def hook_width(model, hook_name: str) -> int:
    """The width of the activation at ``hook_name`` (``hook_z`` counted with heads concatenated)."""
    cfg = model.cfg
    if hook_name not in model.hook_dict:
        raise ValueError(f"the model {cfg.model_name!r} has no hook {hook_name!r}")
    leaf = hook_name.rsplit(".", 1)[-1]
    if leaf in ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result"):
        return cfg.n_heads * cfg.d_head
    if leaf in ("hook_pre", "hook_post"):
        return cfg.d_mlp
    if leaf in ("hook_pattern", "hook_attn_scores"):
        raise ValueError(f"{hook_name} holds attention patterns; no dictionary reads it")
    return cfg.d_model


def check_fits(model, sae) -> None:
    """Raise a ValueError naming the mismatched side if ``sae`` does not read/write the model's hooks."""
    spec = spec_of(sae)
    name = getattr(model.cfg, "model_name", "model")
    for side, hook, width in (("input", spec.hook_in, spec.d_in), ("output", spec.hook_out, spec.d_out)):
        if hook not in model.hook_dict:
            raise ValueError(
                f"dictionary {spec.name} reads/writes {hook!r} ({side}), which model {name!r} does not have "
                f"(it has {model.cfg.n_layers} layers); use a dictionary trained for this model"
            )
        expected = hook_width(model, hook)
        if width != expected:
            raise ValueError(
                f"dictionary {spec.name}: its {side} width is {width} but {name!r} has width {expected} at {hook}; "
                f"the dictionary was trained for another model"
            )
    meta_model = spec.model_name
    if meta_model and name and _official_name(meta_model) != _official_name(name):
        log.warning("dictionary %s says it was trained on %r, the model is %r", spec.name, meta_model, name)


def check_clt_fits(model, clt) -> None:
    """Raise a ValueError if a cross-layer transcoder does not span the model's layers at its hooks' widths."""
    name = getattr(model.cfg, "model_name", "model")
    if clt.n_layers != model.cfg.n_layers:
        raise ValueError(f"the cross-layer transcoder spans {clt.n_layers} layers but {name!r} has {model.cfg.n_layers}; "
                         f"use a CLT trained for this model")
    for layer in (0, clt.n_layers - 1):
        for side, hook in (("input", clt.hook_in(layer)), ("output", clt.hook_out(layer))):
            width = hook_width(model, hook) if hook in model.hook_dict else None
            if width is None:
                raise ValueError(f"the cross-layer transcoder's {side} hook {hook!r} is not a hook of {name!r}")
            if width != clt.cfg.d_model:
                raise ValueError(f"the cross-layer transcoder's {side} width is {clt.cfg.d_model} but {name!r} has width "
                                 f"{width} at {hook}; the CLT was trained for another model")


def _official_name(name: str) -> str:
    """TransformerLens's model name for an alias (``gpt2-small`` -> ``gpt2``, what ``model.cfg.model_name`` holds)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name).split("/")[-1]
    except ValueError:
        return name


def load_suite(name: str, device: str | torch.device = "cpu", path: Path | None = None) -> Suite:
    """Load a suite by name: ``mini`` (embedded, offline) or ``gpt2-small`` (needs the hub or its cache)."""
    if name == "mini":
        from saes.mini_suite import load_mini

        return load_mini(path or MINI_DIR, device=device)
    if name == "gpt2-small":
        from saes.pretrained import load_gpt2_small_suite

        return load_gpt2_small_suite(device=device)
    if name in NAMED_SUITES:
        import importlib

        module, func = NAMED_SUITES[name].split(":")
        loader = getattr(importlib.import_module(module), func)
        return loader(device=device) if name.startswith("gpt2") else loader(path or MINI_DIR, device=device)
    if path is not None and Path(path).is_dir():
        from saes.mini_suite import load_mini

        return load_mini(Path(path), device=device)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(KNOWN_SUITES)} (or pass the folder of a suite)")


def flatten_z(z: Float[Tensor, "... n_heads d_head"]) -> Float[Tensor, "... d_in"]:
    """``hook_z`` with heads concatenated, the layout attention SAEs read."""
    return z.flatten(-2)
