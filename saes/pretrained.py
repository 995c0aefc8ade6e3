"""GPT-2 small with its published dictionaries, loaded the way their authors trained them.

Weight processing: both dictionary sets were trained on ``HookedTransformer.from_pretrained("gpt2-small")``
with TransformerLens's defaults (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``: Kissane et al.'s attention SAEs via sae-lens's ``gpt2-small`` model, Dunefsky et al.'s
transcoders via ``from_pretrained(model_name)`` in their runner). We load the model with exactly those flags,
spelled out, so that ``hook_z`` (value biases folded into ``b_O``), ``ln2.hook_normalized`` (no LayerNorm
weights) and ``hook_mlp_out`` (centred) hold what the dictionaries expect. Loading with ``fold_ln=False`` or
``from_pretrained_no_processing`` silently gives wrong feature activations.

1. Model: TransformerLens ``gpt2-small`` (Hugging Face ``gpt2``).
2. Attention-output SAEs: sae-lens release ``gpt2-small-hook-z-kk``, ids ``blocks.L.hook_z`` (read and write
   ``blocks.L.attn.hook_z``, heads concatenated, d_in 768; d_sae 24,576, or 49,152 at layers 5 and 7).
   Converted to canonical form (``b_dec`` folded out of the encoder input).
3. MLP transcoders: Hugging Face ``pchlenski/gpt2-transcoders``, files
   ``final_sparse_autoencoder_gpt2-small_blocks.{L}.ln2.hook_normalized_24576.pt``: a ``torch.save`` pickle of
   ``{"cfg": <config object>, "state_dict": {W_enc, b_enc, W_dec, b_dec, b_dec_out}}``. Read with torch's
   weights-only unpickler and an allow-list (the config classes become inert records; no code from the file
   runs; anything else in the file is refused), then converted to a sae-lens ``Transcoder``:
   ``b_enc' = b_enc - b_dec @ W_enc`` (the input-side ``b_dec``) and ``b_dec' = b_dec_out``.
4. Offline (``HF_HUB_OFFLINE=1``), the suite loader first checks that every file above is in the Hugging Face
   cache and names what is missing, with the ``huggingface-cli download`` lines that fetch it
   (:func:`download_commands`); online, a hub that cannot be reached gives the same advice.
5. ``gpt2-small`` takes any subset of these 24 dictionaries (``dictionaries={"attn0", "mlp3", ...}``, or the groups
   ``"attn"`` and ``"mlp"``); only the selected files are fetched.
6. ``gpt2-small-clt``: a cross-layer transcoder over all 12 MLPs in circuit-tracer's layout (``config.yaml``,
   ``W_enc_L`` / ``W_dec_L`` safetensors; ``saes/formats.py``), from ``GPT2_CLT_REPO`` by default or any repository
   given. circuit-tracer runs GPT-2 without ``center_writing_weights``, so its CLTs write uncentred MLP outputs;
   the decoders and ``b_dec`` are centred here (their mean over ``d_model`` removed), which is exactly what
   TransformerLens does to ``W_out`` and ``b_out`` and changes nothing downstream (every reader of the residual
   stream is a LayerNorm, which removes the mean). ``ln2.hook_normalized`` is the same under both processings.
   Attention SAEs (``attn{L}``) can be added to it by name.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from saes.dictionary import canonicalize

log = logging.getLogger(__name__)

GPT2_PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
KK_RELEASE = "gpt2-small-hook-z-kk"
TRANSCODER_REPO = "pchlenski/gpt2-transcoders"
TRANSCODER_FILE = "final_sparse_autoencoder_gpt2-small_blocks.{layer}.ln2.hook_normalized_24576.pt"
GPT2_LAYERS = 12
GPT2_REPO = "gpt2"  # what TransformerLens loads for "gpt2-small"
GPT2_FILES = ("config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
              "vocab.json")
# The GPT-2 small CLT trained by circuit-tracer's authors (ReLU, 1B tokens), as EleutherAI hosts it.
GPT2_CLT_REPO = "EleutherAI/gpt2-mntss-transcoder-clt-relu-sp10-1b"
# The configuration classes that the transcoder files pickle. They are rebuilt as inert records.
ALLOWED_CONFIG_CLASSES = (
    "sae_training.config.LanguageModelSAERunnerConfig",
    "sae_training.config.RunnerConfig",
    "sae_training.config.CacheActivationsRunnerConfig",
)


class PickledConfig:
    """An inert stand-in for a pickled configuration object: it stores the attributes and runs nothing."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a pickled config must carry a plain dict of attributes")
        self.__dict__.update(state)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_layer(layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < GPT2_LAYERS:
        raise ValueError(f"GPT-2 small has layers 0..{GPT2_LAYERS - 1}; got layer {layer!r}")


def load_gpt2_small(device: str | torch.device = "cpu"):
    """GPT-2 small in TransformerLens with the processing its dictionaries were trained under."""
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained("gpt2-small", device=str(device), **GPT2_PROCESSING)


def load_kk_attn_sae(layer: int, device: str | torch.device = "cpu"):
    """Kissane et al.'s attention-output SAE for ``blocks.{layer}.attn.hook_z``, in canonical form."""
    from sae_lens import SAE

    _check_layer(layer)
    sae = SAE.from_pretrained(KK_RELEASE, f"blocks.{layer}.hook_z", device=str(device))
    canonicalize(sae)
    meta = sae.cfg.metadata
    meta.hook_name = f"blocks.{layer}.attn.hook_z"
    meta.hook_name_out = f"blocks.{layer}.attn.hook_z"
    meta.kind, meta.layer, meta.model_name = "attn_sae", layer, "gpt2-small"
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def read_transcoder_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config as a dict, state dict) of a Dunefsky et al. transcoder file, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing transcoder file {path}")
    allowed = [(PickledConfig, name) for name in ALLOWED_CONFIG_CLASSES]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} was refused: it asks to run or build something outside the allow-list ({str(e).splitlines()[0]}). "
            f"Only the transcoder config classes {list(ALLOWED_CONFIG_CLASSES)}, tensors and plain containers are "
            f"accepted; re-download the file from {TRANSCODER_REPO} if it should be genuine"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch.save file ({e}); the file is corrupt: re-download it") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ValueError(f"{path}: expected a dict with 'cfg' and 'state_dict' (Dunefsky et al.'s format), got {type(obj).__name__}")
    cfg = obj.get("cfg")
    cfg_dict = cfg.to_dict() if isinstance(cfg, PickledConfig) else dict(cfg or {})
    return cfg_dict, obj["state_dict"]


def transcoder_from_state_dict(state: dict[str, torch.Tensor], layer: int, model_name: str = "gpt2-small"):
    """A canonical sae-lens ``Transcoder`` from a Dunefsky-format state dict, with its shapes checked."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    need = ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"transcoder state dict lacks {missing}; expected keys {list(need)}")
    W_enc, b_enc, W_dec, b_dec, b_dec_out = (state[k].detach().float() for k in need)
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise ValueError(f"W_enc and W_dec must be matrices; got {tuple(W_enc.shape)} and {tuple(W_dec.shape)}")
    d_in, d_sae = W_enc.shape
    if W_dec.shape[0] != d_sae or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(
            f"inconsistent transcoder shapes: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
            f"b_dec {tuple(b_dec.shape)} (need W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_in])"
        )
    d_out = W_dec.shape[1]
    if b_dec_out.shape != (d_out,):
        raise ValueError(f"b_dec_out has shape {tuple(b_dec_out.shape)}, expected ({d_out},)")
    for name, t in zip(need, (W_enc, b_enc, W_dec, b_dec, b_dec_out)):
        if not torch.isfinite(t).all():
            raise ValueError(f"transcoder tensor {name} holds NaN or infinite values; the file is corrupt")
    meta = SAEMetadata(hook_name=f"blocks.{layer}.ln2.hook_normalized", hook_name_out=f"blocks.{layer}.hook_mlp_out",
                       kind="transcoder", layer=layer, model_name=model_name, prepend_bos=True)
    cfg = sae_lens.TranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False, metadata=meta)
    tc = sae_lens.Transcoder(cfg)
    with torch.no_grad():
        tc.W_enc.copy_(W_enc)
        tc.b_enc.copy_((b_enc.double() - b_dec.double() @ W_enc.double()).float())
        tc.W_dec.copy_(W_dec)
        tc.b_dec.copy_(b_dec_out)
    for p in tc.parameters():
        p.requires_grad_(False)
    return tc


def load_dunefsky_transcoder(layer: int, device: str | torch.device = "cpu"):
    """Dunefsky et al.'s MLP transcoder of GPT-2 small at ``layer`` (from the hub, or its local cache)."""
    from huggingface_hub import hf_hub_download

    _check_layer(layer)
    path = hf_hub_download(TRANSCODER_REPO, TRANSCODER_FILE.format(layer=layer))
    _, state = read_transcoder_file(Path(path))
    return transcoder_from_state_dict(state, layer).to(device)


class HubFilesMissing(FileNotFoundError):
    """Files of GPT-2 small or its dictionaries are neither in the Hugging Face cache nor downloadable."""


def kk_file_names(layer: int) -> tuple[str, str]:
    """The state dict and config file of Kissane et al.'s SAE at ``layer``, as sae-lens's directory names them."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    _check_layer(layer)
    path = get_pretrained_saes_directory()[KK_RELEASE].saes_map[f"blocks.{layer}.hook_z"]
    return path, path.split(".pt")[0] + "_cfg.json"


def hub_files(layers: list[int] | None = None, mlp_layers: list[int] | None = None) -> list[tuple[str, str]]:
    """Every (repository, file) that ``load_gpt2_small_suite`` reads from the hub for attention SAEs at ``layers``
    and transcoders at ``mlp_layers`` (both default to every layer; ``mlp_layers`` to ``layers``)."""
    layers = list(range(GPT2_LAYERS)) if layers is None else layers
    mlp_layers = layers if mlp_layers is None else mlp_layers
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    kk_repo = get_pretrained_saes_directory()[KK_RELEASE].repo_id
    files = [(GPT2_REPO, f) for f in GPT2_FILES]
    files += [(kk_repo, f) for layer in layers for f in kk_file_names(layer)]
    files += [(TRANSCODER_REPO, TRANSCODER_FILE.format(layer=layer)) for layer in mlp_layers]
    return files


def download_commands(layers: list[int] | None = None, mlp_layers: list[int] | None = None) -> list[str]:
    """The ``huggingface-cli download`` lines that put every file of :func:`hub_files` in the cache, one per repository."""
    by_repo: dict[str, list[str]] = {}
    for repo, name in hub_files(layers, mlp_layers):
        by_repo.setdefault(repo, []).append(name)
    return [f"huggingface-cli download {repo} " + " ".join(names) for repo, names in by_repo.items()]


_HOW_TO_GET = ("connect to the hub once (the files are then cached), or copy in a Hugging Face cache filled on a "
               "machine that is online and point HF_HUB_CACHE at it; the exact `huggingface-cli download` lines are "
               "printed by: python -c 'from saes.pretrained import download_commands as d; print(*d(), sep=chr(10))'")


def check_hub_cache(layers: list[int] | None = None, cache_dir: str | Path | None = None,
                    mlp_layers: list[int] | None = None) -> None:
    """Offline, raise :class:`HubFilesMissing` naming the files of the suite that the cache lacks (before loading).

    ``cache_dir`` defaults to the hub's (``HF_HUB_CACHE``).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    cache_dir = cache_dir or constants.HF_HUB_CACHE
    files = hub_files(layers, mlp_layers)
    missing = [f"{repo}/{name}" for repo, name in files
               if not isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str)]
    if missing:
        raise HubFilesMissing(
            f"GPT-2 small and its dictionaries need {len(files)} files from the Hugging Face hub; the hub is offline "
            f"(HF_HUB_OFFLINE=1) and {len(missing)} of them are not in the cache {cache_dir} (first: "
            f"{missing[0]}). To get them, {_HOW_TO_GET}"
        )


def select_dictionaries(dictionaries, n_layers: int, allowed: tuple[str, ...] = ("attn", "mlp")) -> dict[str, list[int] | bool]:
    """Names (``attn{L}``, ``mlp{L}``, the groups ``attn`` / ``mlp``, and ``clt`` where allowed) -> layers per kind.

    Returns ``{"attn": [layers], "mlp": [layers], "clt": bool}``; a name this suite cannot give is refused, with the
    names it can.
    """
    import re

    picked: dict[str, set[int]] = {"attn": set(), "mlp": set()}
    clt = False
    names = [dictionaries] if isinstance(dictionaries, str) else list(dictionaries)
    for name in names:
        m = re.fullmatch(r"(attn|mlp)(\d+)?", str(name))
        if name == "clt" and "clt" in allowed:
            clt = True
        elif m and m.group(1) in allowed:
            layers = range(n_layers) if m.group(2) is None else [int(m.group(2))]
            bad = [l for l in layers if not 0 <= l < n_layers]
            if bad:
                raise ValueError(f"dictionary {name!r}: this suite has layers 0..{n_layers - 1}")
            picked[m.group(1)].update(layers)
        else:
            kinds = " ".join(f"{k}0..{k}{n_layers - 1}" if k != "clt" else "clt" for k in allowed)
            raise ValueError(f"unknown dictionary {name!r}; this suite has {kinds} (and the groups "
                             f"{', '.join(k for k in allowed if k != 'clt')})")
    if not (picked["attn"] or picked["mlp"] or clt):
        raise ValueError("no dictionaries selected; name at least one, e.g. mlp or attn0")
    return {"attn": sorted(picked["attn"]), "mlp": sorted(picked["mlp"]), "clt": clt}


def load_gpt2_small_suite(device: str | torch.device = "cpu", layers: list[int] | None = None,
                          dictionaries=None):
    """GPT-2 small with the attention SAE and the transcoder of every layer (or of ``layers``), or with the
    ``dictionaries`` named (``{"attn0", "mlp3"}``, ``{"mlp"}``: see :func:`select_dictionaries`)."""
    from saes.suite import Suite

    layers = list(range(GPT2_LAYERS)) if layers is None else layers
    for l in layers:
        _check_layer(l)
    if dictionaries is None:
        pick = {"attn": layers, "mlp": layers}
    else:
        pick = select_dictionaries(dictionaries, GPT2_LAYERS)
    check_hub_cache(pick["attn"], mlp_layers=pick["mlp"])
    try:
        model = load_gpt2_small(device)
        attn = {l: load_kk_attn_sae(l, device) for l in pick["attn"]}
        mlp = {l: load_dunefsky_transcoder(l, device) for l in pick["mlp"]}
    except OSError as e:  # the hub's connection and missing-entry errors are OSErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubFilesMissing(f"could not load GPT-2 small and its dictionaries from the Hugging Face hub ({first}). "
                              f"To get them, {_HOW_TO_GET}") from None
    return Suite(name="gpt2-small", model=model, attn_saes=attn, transcoders=mlp,
                 info={"processing": GPT2_PROCESSING, "attn_release": KK_RELEASE, "transcoder_repo": TRANSCODER_REPO,
                       "dictionaries": [*(f"attn{l}" for l in attn), *(f"mlp{l}" for l in mlp)]})


def center_clt_writes(clt):
    """Remove each CLT decoder vector's (and ``b_dec``'s) mean over ``d_model``: ``center_writing_weights`` for a CLT."""
    with torch.no_grad():
        for w in clt.W_dec:
            w.sub_(w.mean(-1, keepdim=True))
        clt.b_dec.sub_(clt.b_dec.mean(-1, keepdim=True))
    return clt


def load_gpt2_small_clt(device: str | torch.device = "cpu", repo: str = GPT2_CLT_REPO):
    """A GPT-2 small cross-layer transcoder in circuit-tracer's layout (hub reference or folder), writes centred."""
    from saes.formats import load_clt

    clt = load_clt(repo, model_name="gpt2-small")
    if clt.n_layers != GPT2_LAYERS:
        raise ValueError(f"{repo}: the CLT spans {clt.n_layers} layers; GPT-2 small has {GPT2_LAYERS}")
    return center_clt_writes(clt).to(device)


def load_gpt2_small_clt_suite(device: str | torch.device = "cpu", dictionaries=None, repo: str = GPT2_CLT_REPO):
    """GPT-2 small with a cross-layer transcoder (``repo``) and, if named in ``dictionaries``, Kissane et al.'s
    attention SAEs (``{"clt", "attn"}``, ``{"clt", "attn5"}``); by default the CLT alone."""
    from saes.suite import Suite

    pick = select_dictionaries(dictionaries or {"clt"}, GPT2_LAYERS, allowed=("attn", "clt"))
    clt = load_gpt2_small_clt(device, repo) if pick["clt"] else None
    model = load_gpt2_small(device)
    attn = {l: load_kk_attn_sae(l, device) for l in pick["attn"]}
    return Suite(name="gpt2-small-clt", model=model, attn_saes=attn, transcoders={}, clt=clt,
                 info={"processing": GPT2_PROCESSING, "attn_release": KK_RELEASE, "clt_repo": repo if clt else None,
                       "dictionaries": [*(f"attn{l}" for l in attn), *(["clt"] if clt else [])]})
