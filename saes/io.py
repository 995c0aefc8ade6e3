"""Save and load this project's own files: safetensors plus ``cfg.json``, written atomically. Never pickle.

A dictionary directory holds ``sae_weights.safetensors`` and ``cfg.json`` (sae-lens's own layout, so
``sae_lens.SAE.load_from_disk`` reads it too). A model directory holds ``model.safetensors`` and ``cfg.json``
(the ``HookedTransformerConfig`` fields that define the architecture).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CFG = "cfg.json"

# The HookedTransformerConfig fields that define a model we train; everything else takes its default.
MODEL_CFG_FIELDS = (
    "n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out", "act_fn",
    "normalization_type", "positional_embedding_type", "attn_only", "model_name", "original_architecture",
    "default_prepend_bos", "eps", "seed",
)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` whole, on failure it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with _atomic_target(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt: rebuild or re-download it") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


# Buffers that legitimately hold -inf (TransformerLens's attention mask fill value).
NONFINITE_BUFFERS = (".IGNORE",)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the file is corrupt: rebuild or re-download it") from e
    for name, t in tensors.items():
        if t.is_floating_point() and not name.endswith(NONFINITE_BUFFERS) and not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is corrupt")
    return tensors


def save_dictionary(sae, directory: Path) -> Path:
    """Write a sae-lens dictionary as ``sae_weights.safetensors`` + ``cfg.json``."""
    directory = Path(directory)
    state = {k: v for k, v in sae.state_dict().items()}
    atomic_save_tensors(state, directory / SAE_WEIGHTS)
    cfg = sae.cfg.to_dict()
    cfg["device"] = "cpu"
    atomic_write_json(directory / SAE_CFG, cfg)
    return directory


def load_dictionary(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a dictionary written by :func:`save_dictionary` (or by sae-lens's ``save_model``)."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    from saes.dictionary import _topk_transcoder_classes, canonicalize

    directory = Path(directory)
    cfg = read_json(directory / SAE_CFG)
    arch = cfg.get("architecture")
    if arch in ("topk_transcoder", "topk_skip_transcoder"):
        _topk_transcoder_classes(skip=arch == "topk_skip_transcoder")
    if arch not in SAE_CLASS_REGISTRY:
        raise ValueError(f"{directory / SAE_CFG}: unknown dictionary architecture {arch!r}; known: {sorted(SAE_CLASS_REGISTRY)}")
    sae_cls, cfg_cls = SAE_CLASS_REGISTRY[arch]
    cfg["device"] = "cpu"
    sae = sae_cls(cfg_cls.from_dict(cfg))
    state = read_tensors(directory / SAE_WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ValueError(f"{directory}: weights do not match cfg.json (expected {expected}, found {found}); the files are inconsistent")
    sae.load_state_dict(state)
    canonicalize(sae)
    return sae.to(device=device, dtype=dtype) if dtype is not None else sae.to(device)


def model_config_dict(cfg) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in MODEL_CFG_FIELDS if hasattr(cfg, k)}


def save_model(model, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a HookedTransformer as ``model.safetensors`` + ``cfg.json`` (plus ``extra`` keys in cfg.json)."""
    directory = Path(directory)
    # Buffers (causal mask, IGNORE) are rebuilt by the constructor; only parameters are saved.
    params = {k: v for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}
    atomic_save_tensors(params, directory / MODEL_WEIGHTS)
    atomic_write_json(directory / MODEL_CFG, {**model_config_dict(model.cfg), **(extra or {})})
    return directory


def load_model(directory: Path, tokenizer=None, device: str | torch.device = "cpu"):
    """Load a HookedTransformer written by :func:`save_model`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    directory = Path(directory)
    raw = read_json(directory / MODEL_CFG)
    cfg = HookedTransformerConfig(**{k: raw[k] for k in MODEL_CFG_FIELDS if k in raw}, device=str(device))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = read_tensors(directory / MODEL_WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(("IGNORE", ".mask"))]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit cfg.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model.to(device, print_details=False)
