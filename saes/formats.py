"""circuit-tracer's dictionary files, read into (and written from) this toolkit's objects, safetensors only.

circuit-tracer (0.5 and its current main) describes a dictionary set with a ``config.yaml``:
``model_kind`` (``transcoder_set`` | ``cross_layer_transcoder``), ``feature_input_hook`` and
``feature_output_hook`` (hook names inside a block, e.g. ``ln2.hook_normalized`` and ``hook_mlp_out``),
optionally ``activation`` (``relu`` | ``jumprelu`` | ``topk``) with ``k``, and optionally ``transcoders``, a list
of per-layer files (local paths or ``hf://org/repo/file`` URIs). Reading a set:

1. Find the folder: a local directory, or a hub reference ``org/repo[/subfolder][@revision]`` whose
   ``config.yaml`` and ``*.safetensors`` are fetched with ``huggingface_hub`` (its cache is used offline).
2. Check the config: the kind, and hooks this toolkit can place (``ln2.hook_normalized`` -> ``hook_mlp_out``).
   Anything else is refused with one line that names it, before any weights are read.
3. Per-layer transcoders (``layer_{L}.safetensors``, or the config's list): tensors ``W_enc [d_sae, d_model]``,
   ``W_dec [d_sae, d_out]``, ``b_enc [d_sae]``, ``b_dec [d_out]``, optional ``W_skip [d_out, d_model]`` and
   ``activation_function.threshold [d_sae]``. They become canonical sae-lens transcoders
   (``saes/dictionary.py``): ``W_enc`` transposed, the rest copied. ``W_skip`` makes a skip transcoder (the same
   ``x @ W_skip.T`` convention in both libraries).
4. Activations keep the file's semantics exactly:
   - ``relu``: ``relu(pre)``, the same in both;
   - JumpReLU (a threshold in the file, and ``activation`` absent or ``jumprelu``): circuit-tracer computes
     ``pre * (pre > threshold)``, sae-lens ``relu(pre) * (pre > threshold)``; the two agree wherever the threshold
     is >= 0, so a negative threshold is refused;
   - ``topk`` (``k`` in the config): circuit-tracer keeps the ``k`` largest pre-activations *even when negative*;
     the transcoder is built with ``topk_relu=False``, which does exactly that (sae-lens's TopK would clamp them).
5. Cross-layer transcoders: ``W_enc_{L}.safetensors`` holding ``W_enc_{L} [d_sae, d_model]``, ``b_enc_{L}``,
   ``b_dec_{L}`` and optionally ``threshold_{L}``, and ``W_dec_{L}.safetensors`` holding
   ``W_dec_{L} [d_sae, n_layers - L, d_model]``, become a ``saes.clt.CrossLayerTranscoder`` (relu, or JumpReLU
   ``pre * (pre > threshold)`` with the same non-negative rule).
6. Every tensor's name, shape and finiteness is checked; unknown tensors, other file types (``.pt``, ``.bin``,
   ``.npz``: pickles are never opened) and gaps in the layers are refused with the file and the fix named.

The writers (``save_transcoder_set``, ``save_clt``) produce the same layout, which circuit-tracer's
``load_transcoder_set`` / ``load_clt`` read (a TopK set needs its config-driven loader, which passes ``activation``
and ``k``; circuit-tracer 0.5's ``load_transcoder_set`` reads ReLU and JumpReLU sets).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saes.clt import CLTConfig, CrossLayerTranscoder
from saes.io import atomic_save_tensors, atomic_write_text, read_tensors

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
MODEL_KINDS = ("transcoder_set", "cross_layer_transcoder")
# The hooks circuit-tracer names inside a block, and this toolkit's address for them.
INPUT_HOOKS = {"ln2.hook_normalized": "blocks.{layer}.ln2.hook_normalized"}
OUTPUT_HOOKS = {"hook_mlp_out": "blocks.{layer}.hook_mlp_out"}
PLT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold")


@dataclass(frozen=True)
class SetConfig:
    """What a circuit-tracer ``config.yaml`` says, checked."""

    model_kind: str
    feature_input_hook: str
    feature_output_hook: str
    activation: str | None = None
    k: int | None = None
    model_name: str = ""
    transcoders: tuple[str, ...] | None = None

    @property
    def hook_in_template(self) -> str:
        return INPUT_HOOKS[self.feature_input_hook]

    @property
    def hook_out_template(self) -> str:
        return OUTPUT_HOOKS[self.feature_output_hook]


def parse_config(raw: Any, where: str) -> SetConfig:
    """Check a loaded ``config.yaml``; one ValueError naming the problem if this toolkit cannot use it."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a YAML mapping, found {type(raw).__name__}")
    kind = raw.get("model_kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"{where}: model_kind must be one of {MODEL_KINDS}, got {kind!r}")
    hook_in, hook_out = raw.get("feature_input_hook"), raw.get("feature_output_hook")
    if hook_in not in INPUT_HOOKS:
        raise ValueError(
            f"{where}: feature_input_hook {hook_in!r} is not supported; this toolkit's transcoders read the MLP's "
            f"normalised input ({', '.join(INPUT_HOOKS)}). A set trained on hook_resid_mid reads through the MLP's "
            f"LayerNorm, which is not linear; retrain or convert it to read ln2.hook_normalized")
    if hook_out not in OUTPUT_HOOKS:
        raise ValueError(f"{where}: feature_output_hook {hook_out!r} is not supported; transcoders here write "
                         f"{', '.join(OUTPUT_HOOKS)}")
    activation = raw.get("activation")
    if activation not in (None, "relu", "jumprelu", "topk"):
        raise ValueError(f"{where}: activation {activation!r} is not one of relu, jumprelu, topk")
    k = raw.get("k")
    if activation == "topk":
        if kind == "cross_layer_transcoder":
            raise ValueError(f"{where}: circuit-tracer has no TopK cross-layer transcoder; activation must be relu or jumprelu")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"{where}: activation topk needs a positive integer k in the config, got {k!r}")
    elif k is not None:
        raise ValueError(f"{where}: k={k!r} is given but activation is {activation!r}; k only applies to topk")
    files = raw.get("transcoders")
    if files is not None:
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files) or not files:
            raise ValueError(f"{where}: transcoders must be a non-empty list of file paths or hf:// URIs")
        files = tuple(files)
    return SetConfig(kind, hook_in, hook_out, activation, k, str(raw.get("model_name") or ""), files)


def read_config(path: Path) -> SetConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: a circuit-tracer dictionary folder holds a config.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: plain data only, no objects built
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); the file is corrupt") from None
    return parse_config(raw, str(path))


# --- finding the files -------------------------------------------------------------------------------
def _hub_error(repo: str, e: Exception) -> ValueError:
    return ValueError(
        f"could not get {repo} from the Hugging Face hub, and its files are not in the local cache "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); connect to the network once to download "
        f"it, or point HF_HUB_CACHE at a cache that holds it")


def parse_hub_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``org/repo[/subfolder][@revision]`` -> (repo id, subfolder, revision)."""
    path, _, revision = ref.partition("@")
    parts = path.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{ref!r} is neither a local folder nor a hub reference org/repo[/subfolder][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def fetch(source: str | Path) -> Path:
    """The local folder of a circuit-tracer set: ``source`` itself, or its hub snapshot (config first)."""
    local = Path(source)
    if local.is_dir():
        return local
    if isinstance(source, Path) or str(source).startswith(("/", ".", "~")) or local.exists():
        raise FileNotFoundError(f"{source} is not a folder; give the folder that holds the set's {CONFIG}, or a hub "
                                f"reference org/repo[/subfolder][@revision]")
    repo, sub, revision = parse_hub_ref(str(source))
    from huggingface_hub import hf_hub_download, snapshot_download

    prefix = f"{sub}/" if sub else ""
    try:
        cfg_path = hf_hub_download(repo, CONFIG, subfolder=sub, revision=revision)
    except Exception as e:  # offline without a cache, unknown repo, network down: all one message
        raise _hub_error(repo, e) from None
    read_config(Path(cfg_path))  # refuse an unusable set before downloading its weights
    try:
        root = snapshot_download(repo, revision=revision, allow_patterns=[prefix + CONFIG, prefix + "*.safetensors"])
    except Exception as e:
        raise _hub_error(repo, e) from None
    return Path(root) / sub if sub else Path(root)


def _fetch_file(ref: str, base: Path) -> Path:
    """A file of the config's ``transcoders`` list: ``hf://org/repo/file[?revision=R]``, or a path (relative to the set)."""
    if ref.startswith("hf://"):
        from urllib.parse import parse_qs, urlparse

        from huggingface_hub import hf_hub_download

        url = urlparse(ref)
        repo_name, _, file = url.path.lstrip("/").partition("/")
        if not (url.netloc and repo_name and file):
            raise ValueError(f"{ref!r}: an hf:// URI needs hf://org/repo/file")
        repo = f"{url.netloc}/{repo_name}"
        revision = (parse_qs(url.query).get("revision") or [None])[0]
        try:
            return Path(hf_hub_download(repo, file, revision=revision))
        except Exception as e:
            raise _hub_error(repo, e) from None
    path = Path(ref)
    return path if path.is_absolute() else base / path


def _check_safetensors(path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors dictionary files are read (pickled .pt/.bin and .npz files are "
                         f"not opened); convert it to safetensors")
    return path


def _layer_files(folder: Path, pattern: str, what: str) -> list[Path]:
    """``pattern`` with ``{layer}`` numbered 0..n-1 without gaps, or a ValueError naming the gap."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\{layer\}", r"(\d+)") + "$")
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := rx.match(p.name))}
    if not found:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".bin", ".npz", ".pth"))
        hint = f" (found {others}: pickles are not opened; convert them to safetensors)" if others else ""
        raise ValueError(f"{folder}: no {pattern.format(layer='N')} files for the {what}{hint}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ValueError(f"{folder}: {what} files for layers {missing} are missing (found {sorted(found)}); every layer "
                         f"from 0 up needs one")
    return [found[i] for i in range(len(found))]


# --- per-layer transcoders ---------------------------------------------------------------------------
def _shape_error(where: str, name: str, t: Tensor, want: tuple) -> ValueError:
    return ValueError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {want}")


def transcoder_from_tensors(tensors: dict[str, Tensor], layer: int, cfg: SetConfig, where: str = "transcoder"):
    """A canonical sae-lens transcoder from one circuit-tracer ``layer_L.safetensors`` state dict."""
    from saes.dictionary import DictionarySpec, build_dictionary

    unknown = sorted(set(tensors) - set(PLT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown tensors {unknown}; a circuit-tracer transcoder holds {list(PLT_KEYS)}")
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}")
    W_enc, W_dec, b_enc, b_dec = (tensors[k].float() for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
    if W_enc.ndim != 2:
        raise _shape_error(where, "W_enc", W_enc, ("d_sae", "d_model"))
    d_sae, d_in = W_enc.shape
    if W_dec.ndim != 2 or W_dec.shape[0] != d_sae:
        raise _shape_error(where, "W_dec", W_dec, (d_sae, "d_out"))
    d_out = W_dec.shape[1]
    if b_enc.shape != (d_sae,):
        raise _shape_error(where, "b_enc", b_enc, (d_sae,))
    if b_dec.shape != (d_out,):
        raise _shape_error(where, "b_dec", b_dec, (d_out,))
    W_skip = tensors.get("W_skip")
    if W_skip is not None and W_skip.shape != (d_out, d_in):
        raise _shape_error(where, "W_skip", W_skip, (d_out, d_in))
    threshold = tensors.get("activation_function.threshold")
    activation = cfg.activation
    if threshold is not None:
        if activation not in (None, "jumprelu"):
            raise ValueError(f"{where}: the file holds a JumpReLU threshold but the config says activation {activation!r}")
        threshold = threshold.float().reshape(-1) if threshold.numel() == d_sae else threshold
        if threshold.shape != (d_sae,):
            raise _shape_error(where, "activation_function.threshold", threshold, (d_sae,))
        if (threshold < 0).any():
            raise ValueError(f"{where}: {int((threshold < 0).sum())} JumpReLU thresholds are negative; circuit-tracer's "
                             f"pre * (pre > t) then passes negative activations, which sae-lens's JumpReLU does not "
                             f"represent")
        activation = "jumprelu"
    elif activation == "jumprelu":
        raise ValueError(f"{where}: the config says jumprelu but the file has no activation_function.threshold")
    activation = activation or "relu"
    if cfg.k is not None and cfg.k > d_sae:
        raise ValueError(f"{where}: k={cfg.k} is larger than the transcoder's {d_sae} features")
    hook_in, hook_out = cfg.hook_in_template.format(layer=layer), cfg.hook_out_template.format(layer=layer)
    spec = DictionarySpec("transcoder", layer, d_in, d_sae, d_out, hook_in, hook_out, activation=activation,
                          k=cfg.k if activation == "topk" else None, model_name=cfg.model_name,
                          skip=W_skip is not None, topk_relu=activation != "topk")
    tc = build_dictionary(spec)
    with torch.no_grad():
        tc.W_enc.copy_(W_enc.T)
        tc.W_dec.copy_(W_dec)
        tc.b_enc.copy_(b_enc)
        tc.b_dec.copy_(b_dec)
        if W_skip is not None:
            tc.W_skip.copy_(W_skip.float())
        if threshold is not None:
            tc.threshold.copy_(threshold)
    for p in tc.parameters():
        p.requires_grad_(False)
    return tc


def load_transcoder_set(source: str | Path, layers: list[int] | None = None, device: str | torch.device = "cpu",
                        model_name: str | None = None) -> dict[int, Any]:
    """circuit-tracer per-layer transcoders (a folder or hub reference), by layer, as canonical sae-lens objects."""
    folder = fetch(source)
    cfg = read_config(folder / CONFIG)
    if cfg.model_kind != "transcoder_set":
        raise ValueError(f"{folder / CONFIG}: model_kind is {cfg.model_kind!r}; load a cross-layer transcoder with load_clt")
    if model_name is not None:
        cfg = SetConfig(**{**cfg.__dict__, "model_name": model_name})
    if cfg.transcoders is not None:
        files = [_fetch_file(f, folder) for f in cfg.transcoders if _check_safetensors(Path(f.split("?")[0]))]
    else:
        files = _layer_files(folder, "layer_{layer}.safetensors", "transcoder")
    wanted = range(len(files)) if layers is None else layers
    bad = [l for l in wanted if not 0 <= l < len(files)]
    if bad:
        raise ValueError(f"{source}: the set has transcoders for layers 0..{len(files) - 1}; asked for {bad}")
    return {l: transcoder_from_tensors(read_tensors(files[l]), l, cfg, where=str(files[l])).to(device) for l in wanted}


def save_transcoder_set(transcoders: dict[int, Any], directory: Path, model_name: str = "") -> Path:
    """Write transcoders (layers 0..n-1, one activation for all) as a circuit-tracer ``transcoder_set``."""
    from saes.dictionary import spec_of

    directory = Path(directory)
    if sorted(transcoders) != list(range(len(transcoders))):
        raise ValueError(f"a circuit-tracer set needs transcoders for layers 0..n-1 without gaps, got {sorted(transcoders)}")
    specs = {l: spec_of(tc) for l, tc in transcoders.items()}
    topk = {(s.k, s.topk_relu) for s in specs.values() if s.activation == "topk"}
    if topk and (len(topk) > 1 or len(topk) < 1 or any(s.activation != "topk" for s in specs.values())):
        raise ValueError(f"circuit-tracer's TopK is one k for the whole set; these transcoders mix "
                         f"{sorted({(s.activation, s.k) for s in specs.values()}, key=str)}")
    k, topk_relu = next(iter(topk)) if topk else (None, False)
    if topk and topk_relu:
        raise ValueError("these TopK transcoders clamp negative kept activations (topk_relu=True); circuit-tracer's TopK "
                         "keeps them, so the files would compute something else")
    for l, tc in transcoders.items():
        if specs[l].activation == "jumprelu" and (tc.threshold < 0).any():
            raise ValueError(f"layer {l}: negative JumpReLU thresholds; circuit-tracer's pre * (pre > t) would differ")
        state = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if getattr(tc, "W_skip", None) is not None:
            state["W_skip"] = tc.W_skip
        if specs[l].activation == "jumprelu":  # per file: circuit-tracer reads a threshold as JumpReLU, none as ReLU
            state["activation_function.threshold"] = tc.threshold
        atomic_save_tensors({k_: v.detach().float() for k_, v in state.items()}, directory / f"layer_{l}.safetensors")
    lines = ["model_kind: transcoder_set", "feature_input_hook: ln2.hook_normalized", "feature_output_hook: hook_mlp_out"]
    if model_name:
        lines.append(f"model_name: {model_name}")
    if topk:
        lines += ["activation: topk", f"k: {k}"]
    atomic_write_text(directory / CONFIG, "\n".join(lines) + "\n")
    return directory


# --- cross-layer transcoders -------------------------------------------------------------------------
def load_clt(source: str | Path, device: str | torch.device = "cpu", model_name: str | None = None) -> CrossLayerTranscoder:
    """A circuit-tracer cross-layer transcoder (a folder or hub reference) as a ``CrossLayerTranscoder``."""
    folder = fetch(source)
    cfg = read_config(folder / CONFIG)
    if cfg.model_kind != "cross_layer_transcoder":
        raise ValueError(f"{folder / CONFIG}: model_kind is {cfg.model_kind!r}; load a transcoder set with load_transcoder_set")
    enc_files = _layer_files(folder, "W_enc_{layer}.safetensors", "CLT encoder")
    dec_files = _layer_files(folder, "W_dec_{layer}.safetensors", "CLT decoder")
    n = len(enc_files)
    if len(dec_files) != n:
        raise ValueError(f"{folder}: {n} encoder files but {len(dec_files)} decoder files; a CLT has one of each per layer")
    encs = [read_tensors(p) for p in enc_files]
    first = encs[0].get("W_enc_0")
    if first is None or first.ndim != 2:
        raise ValueError(f"{enc_files[0]}: missing the matrix W_enc_0 [d_sae, d_model]")
    d_sae, d_model = first.shape
    has_threshold = "threshold_0" in encs[0]
    if cfg.activation == "jumprelu" and not has_threshold:
        raise ValueError(f"{folder / CONFIG}: activation jumprelu but {enc_files[0]} has no threshold_0")
    if cfg.activation == "relu" and has_threshold:
        raise ValueError(f"{folder / CONFIG}: activation relu but the encoder files hold JumpReLU thresholds")
    clt = CrossLayerTranscoder(CLTConfig(
        n, d_model, d_sae, activation="jumprelu" if has_threshold else "relu",
        hook_in_template=cfg.hook_in_template, hook_out_template=cfg.hook_out_template,
        model_name=model_name if model_name is not None else cfg.model_name))
    with torch.no_grad():
        for l, (tensors, path) in enumerate(zip(encs, enc_files)):
            want = {f"W_enc_{l}": (d_sae, d_model), f"b_enc_{l}": (d_sae,), f"b_dec_{l}": (d_model,)}
            if has_threshold:
                want[f"threshold_{l}"] = (d_sae,)
            extra = sorted(set(tensors) - set(want))
            if extra:
                hint = " (CLT skip connections are not supported)" if any("skip" in e.lower() for e in extra) else ""
                raise ValueError(f"{path}: unknown tensors {extra}; expected {sorted(want)}{hint}")
            for name, shape in want.items():
                if name not in tensors:
                    raise ValueError(f"{path}: missing tensor {name}")
                t = tensors[name]
                t = t.reshape(shape) if name.startswith("threshold") and t.numel() == d_sae else t
                if tuple(t.shape) != shape:
                    raise _shape_error(str(path), name, t, shape)
                tensors[name] = t.float()
            clt.W_enc[l].copy_(tensors[f"W_enc_{l}"].T)
            clt.b_enc[l].copy_(tensors[f"b_enc_{l}"])
            clt.b_dec[l].copy_(tensors[f"b_dec_{l}"])
            if has_threshold:
                th = tensors[f"threshold_{l}"]
                if (th < 0).any():
                    raise ValueError(f"{path}: {int((th < 0).sum())} JumpReLU thresholds are negative; circuit-tracer's "
                                     f"pre * (pre > t) then passes negative activations, which this CLT does not represent")
                clt.threshold[l].copy_(th)
        for l, path in enumerate(dec_files):
            tensors = read_tensors(path)
            name, shape = f"W_dec_{l}", (d_sae, n - l, d_model)
            if set(tensors) != {name}:
                raise ValueError(f"{path}: expected exactly the tensor {name}, found {sorted(tensors)}")
            if tuple(tensors[name].shape) != shape:
                raise _shape_error(str(path), name, tensors[name], shape)
            clt.W_dec[l].copy_(tensors[name].float())
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt.to(device)


def save_clt(clt: CrossLayerTranscoder, directory: Path) -> Path:
    """Write a relu or JumpReLU CLT in circuit-tracer's layout (``W_enc_L`` / ``W_dec_L`` files + config.yaml)."""
    directory = Path(directory)
    c = clt.cfg
    if c.activation == "topk":
        raise ValueError("circuit-tracer has no TopK cross-layer transcoder; only relu and jumprelu CLTs can be written")
    rev_in = {v: k for k, v in INPUT_HOOKS.items()}
    rev_out = {v: k for k, v in OUTPUT_HOOKS.items()}
    if c.hook_in_template not in rev_in or c.hook_out_template not in rev_out:
        raise ValueError(f"only CLTs reading {list(INPUT_HOOKS.values())} and writing {list(OUTPUT_HOOKS.values())} can be written")
    for l in range(c.n_layers):
        enc = {f"W_enc_{l}": clt.W_enc[l].T, f"b_enc_{l}": clt.b_enc[l], f"b_dec_{l}": clt.b_dec[l]}
        if c.activation == "jumprelu":
            enc[f"threshold_{l}"] = clt.threshold[l]
        atomic_save_tensors({k: v.detach().float() for k, v in enc.items()}, directory / f"W_enc_{l}.safetensors")
        atomic_save_tensors({f"W_dec_{l}": clt.W_dec[l].detach().float()}, directory / f"W_dec_{l}.safetensors")
    lines = ["model_kind: cross_layer_transcoder", f"feature_input_hook: {rev_in[c.hook_in_template]}",
             f"feature_output_hook: {rev_out[c.hook_out_template]}"]
    if c.model_name:
        lines.append(f"model_name: {c.model_name}")
    atomic_write_text(directory / CONFIG, "\n".join(lines) + "\n")
    return directory


def suite_with_set(suite, source: str | Path, name: str | None = None, keep_attention: bool = True):
    """``suite``'s model (and attention SAEs) with a circuit-tracer set in place of its MLP dictionaries.

    A ``transcoder_set`` replaces the per-layer transcoders; a ``cross_layer_transcoder`` becomes the suite's CLT
    (and the per-layer transcoders go). The set's shapes are checked against the model (``Suite``).
    """
    from saes.suite import Suite

    folder = fetch(source)
    kind = read_config(folder / CONFIG).model_kind
    model_name = suite.model.cfg.model_name
    attn = dict(suite.attn_saes) if keep_attention else {}
    info = {**suite.info, "circuit_tracer_set": str(source)}
    if kind == "transcoder_set":
        tcs = load_transcoder_set(folder, device=suite.device, model_name=model_name)
        return Suite(name or f"{suite.name}+set", suite.model, attn, tcs, info=info)
    clt = load_clt(folder, device=suite.device, model_name=model_name)
    return Suite(name or f"{suite.name}+clt", suite.model, attn, {}, info=info, clt=clt)
