"""sae-lens's pretrained registry (or any hub repository in sae-lens's layout), for the dictionaries that fit here.

``load_sae_lens_dictionary(release, sae_id, model)``:

1. Fetch only the config (``sae_lens.loading.pretrained_sae_loaders.load_sae_config_from_huggingface``) and place
   the dictionary by its hooks, before any weights are read:
   - ``blocks.L.attn.hook_z`` (or sae-lens's alias ``blocks.L.hook_z``): an attention SAE, heads concatenated;
   - ``blocks.L.ln2.hook_normalized`` -> ``blocks.L.hook_mlp_out``: an MLP transcoder;
   - ``blocks.L.hook_attn_out``: an attention-output SAE, converted into an SAE on ``hook_z`` (step 3);
   anything else (residual-stream or MLP-output SAEs, other transcoder hooks, normalised activations) is refused
   with one line naming the hook.
2. Load it with sae-lens and bring it to canonical form (``b_dec`` folded out of the encoder input).
3. ``hook_attn_out`` -> ``hook_z``. The attention output is linear in ``z`` (heads concatenated):
   ``attn_out = z @ W_O + b_O`` with ``W_O: [n_heads * d_head, d_model]`` (TransformerLens's ``W_O`` flattened).
   So the SAE reads ``z`` linearly (as OpenMOSS's attention SAEs are read, Ge et al. 2024):
   - encoder, exact: ``W_enc_z = W_O @ W_enc``, ``b_enc_z = b_enc + b_O @ W_enc``;
   - decoder: ``W_dec_z = W_dec @ pinv(W_O)``, ``b_dec_z = (b_dec - b_O) @ pinv(W_O)``, so that
     ``W_dec_z @ W_O + b_O`` gives back the SAE's own reconstruction of ``attn_out``. This is exact when ``W_O``
     has rank ``d_model`` (``n_heads * d_head >= d_model``, as in GPT-2); the relative error is measured and a
     dictionary whose decoder cannot be carried over to 1e-4 is refused.
   The result is an ordinary attention SAE of this toolkit (reads and writes ``hook_z``): its features, activations
   and attention-output reconstruction equal the original's, and its error node, mapped through ``W_O``, is the
   original's error on ``attn_out``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from saes.dictionary import DictionarySpec, build_dictionary, canonicalize, spec_of

log = logging.getLogger(__name__)

Z_HOOK = re.compile(r"blocks\.(\d+)\.(?:attn\.)?hook_z")
ATTN_OUT_HOOK = re.compile(r"blocks\.(\d+)\.hook_attn_out")
MLP_IN_HOOK = re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized")
MAX_DECODER_ERROR = 1e-4
# What the hub raises when it cannot be reached and the cache does not hold the file (LocalEntryNotFoundError is an
# OSError; HTTP failures are HfHubHTTPError, also an OSError subclass in huggingface_hub 0.36).
_HUB_ERRORS = (OSError,)


def _hub_error(release: str, sae_id: str, e: Exception) -> ValueError:
    return ValueError(
        f"could not get sae-lens {release!r} / {sae_id!r} from the Hugging Face hub, and it is not in the local cache "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); connect to the network once, or point "
        f"HF_HUB_CACHE at a cache that holds it")


def sae_lens_config(release: str, sae_id: str) -> dict[str, Any]:
    """The dictionary's sae-lens config (no weights fetched)."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    info = get_pretrained_saes_directory().get(release)
    if info is not None and sae_id not in info.saes_map:
        some = ", ".join(list(info.saes_map)[:6])
        raise ValueError(f"sae-lens release {release!r} has no id {sae_id!r}; it has {some}, ...")
    try:
        return load_sae_config_from_huggingface(release, sae_id)
    except _HUB_ERRORS as e:
        raise _hub_error(release, sae_id, e) from None


def placement(cfg: dict[str, Any], where: str = "dictionary") -> tuple[str, int]:
    """(``attn_z`` | ``attn_out`` | ``transcoder``, layer) for a sae-lens config, or a ValueError saying why not."""
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or ""
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
    from saes.dictionary import ARCHITECTURES

    arch = cfg.get("architecture") or "standard"
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} is not one this toolkit computes ({', '.join(ARCHITECTURES)})")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ValueError(f"{where}: normalize_activations={norm!r} rescales its input; only unnormalised dictionaries "
                         f"are placed in a linear graph")
    fits = ("fits here: SAEs on blocks.L.attn.hook_z or blocks.L.hook_attn_out, transcoders "
            "blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out")
    if (m := MLP_IN_HOOK.fullmatch(hook)) and hook_out == f"blocks.{m.group(1)}.hook_mlp_out":
        return "transcoder", int(m.group(1))
    if hook_out and hook_out != hook:
        raise ValueError(f"{where}: a transcoder {hook} -> {hook_out}; only what {fits}")
    if m := Z_HOOK.fullmatch(hook):
        return "attn_z", int(m.group(1))
    if m := ATTN_OUT_HOOK.fullmatch(hook):
        return "attn_out", int(m.group(1))
    raise ValueError(f"{where} reads {hook or 'no hook'!r}; only what {fits}")


def attn_out_to_hook_z(sae, model, layer: int):
    """An SAE on ``blocks.L.hook_attn_out`` (canonical) as an SAE on ``blocks.L.attn.hook_z`` (module docstring)."""
    cfg = model.cfg
    d_z = cfg.n_heads * cfg.d_head
    W_O = model.blocks[layer].attn.W_O.detach().double().reshape(d_z, cfg.d_model)
    b_O = model.blocks[layer].attn.b_O.detach().double()
    spec = spec_of(sae)
    if spec.d_in != cfg.d_model:
        raise ValueError(f"the hook_attn_out SAE has width {spec.d_in}; the model's d_model is {cfg.d_model}")
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    pinv = torch.linalg.pinv(W_O)
    W_dec_z, b_dec_z = W_dec @ pinv, (b_dec - b_O) @ pinv
    err = max(float((W_dec_z @ W_O - W_dec).norm() / W_dec.norm().clamp_min(1e-30)),
              float((b_dec_z @ W_O + b_O - b_dec).norm() / b_dec.norm().clamp_min(1e-12)))
    if err > MAX_DECODER_ERROR:
        raise ValueError(f"layer {layer}: W_O (rank {int(torch.linalg.matrix_rank(W_O))} of d_model {cfg.d_model}) cannot "
                         f"carry the decoder back to hook_z (relative error {err:.1e} > {MAX_DECODER_ERROR:g}); this "
                         f"attention-output SAE cannot be placed on hook_z exactly")
    new_spec = DictionarySpec.attn_sae(layer, d_z, spec.d_sae, activation=spec.activation, k=spec.k,
                                       model_name=spec.model_name or cfg.model_name)
    out = build_dictionary(new_spec, converted_from=f"blocks.{layer}.hook_attn_out", decoder_transfer_error=err)
    with torch.no_grad():
        out.W_enc.copy_((W_O @ W_enc).float())
        out.b_enc.copy_((b_enc + b_O @ W_enc).float())
        out.W_dec.copy_(W_dec_z.float())
        out.b_dec.copy_(b_dec_z.float())
        if spec.activation == "jumprelu":
            out.threshold.copy_(sae.threshold.detach())
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def load_sae_lens_dictionary(release: str, sae_id: str, model=None, device: str | torch.device = "cpu"):
    """A sae-lens pretrained dictionary, placed at this toolkit's hooks in canonical form (module docstring).

    ``model`` (a HookedTransformer) is needed for ``hook_attn_out`` SAEs, whose encoder folds in its ``W_O``.
    """
    from sae_lens import SAE

    where = f"sae-lens {release!r} / {sae_id!r}"
    kind, layer = placement(sae_lens_config(release, sae_id), where)
    if kind == "attn_out" and model is None:
        raise ValueError(f"{where} is a hook_attn_out SAE; pass the model, whose W_O turns it into an SAE on hook_z")
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except _HUB_ERRORS as e:
        raise _hub_error(release, sae_id, e) from None
    arch = sae.cfg.architecture()
    canonicalize(sae)
    meta = sae.cfg.metadata
    if kind == "attn_z":
        meta.hook_name = meta.hook_name_out = f"blocks.{layer}.attn.hook_z"
        meta.kind, meta.layer = "attn_sae", layer
    elif kind == "transcoder":
        meta.kind, meta.layer = "transcoder", layer
    for p in sae.parameters():
        p.requires_grad_(False)
    if kind == "attn_out":
        meta.kind, meta.layer = "sae", layer
        sae = attn_out_to_hook_z(sae, model, layer)
    log.info("loaded %s (%s) as %s", where, arch, spec_of(sae).name)
    return sae.to(device)
