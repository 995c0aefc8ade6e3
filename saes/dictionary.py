"""One representation for every dictionary: sae-lens ``SAE`` / ``Transcoder`` objects in canonical form.

Canonical form, shared by every dictionary this toolkit builds or loads (foreign formats are converted once,
at load time, see ``saes/pretrained.py``):

    pre  = x_in @ W_enc + b_enc            W_enc: [d_in, d_sae]    (no b_dec subtracted from the input)
    acts = relu(pre)                         or relu of the top k of ``pre`` (TopK),
                                             or relu(pre) * (pre > threshold) (JumpReLU)
    out  = acts @ W_dec + b_dec              W_dec: [d_sae, d_out]
         + x_in @ W_skip.T                   W_skip: [d_out, d_in], skip transcoders only (sae-lens's
                                             ``SkipTranscoder``; a linear path from the input, not a feature)

TopK comes in two flavours, recorded in the config as ``topk_relu``: ``True`` (sae-lens's TopK and every
dictionary trained here) clamps a kept pre-activation that is negative to 0; ``False`` (circuit-tracer's
``TopK``, kept for transcoders loaded from its files) keeps the k largest pre-activations as they are, negative
ones included. ``activate`` and the sae-lens module's own forward follow the flag.

A JumpReLU dictionary built here is trained as a BatchTopK dictionary (Bussmann et al. 2024: the top
``k * batch`` activations of a whole batch are kept, so a token uses as many features as it needs and ``k`` is
the mean L0) and used with the threshold that training estimated; ``k`` then names that training target and
is kept in the metadata (``batch_topk_k``). Pretrained JumpReLU dictionaries load with ``k = None``.

Each dictionary knows where it reads and writes, as TransformerLens hook names, in ``sae.cfg.metadata``:
``hook_name`` (input), ``hook_name_out`` (output), ``kind`` (``attn_sae`` | ``transcoder``), ``layer``.
An attention-output SAE reads and writes ``blocks.L.attn.hook_z`` with heads concatenated
(``d_in = n_heads * d_head``); an MLP transcoder reads ``blocks.L.ln2.hook_normalized`` and writes
``blocks.L.hook_mlp_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

Kind = Literal["attn_sae", "transcoder", "sae"]
Activation = Literal["relu", "topk", "jumprelu"]
KINDS = ("attn_sae", "transcoder", "sae")
ACTIVATIONS = ("relu", "topk", "jumprelu")


def attn_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def transcoder_hooks(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


@dataclass(frozen=True)
class DictionarySpec:
    """What a dictionary is: where it reads and writes, its widths and its activation."""

    kind: Kind
    layer: int
    d_in: int
    d_sae: int
    d_out: int
    hook_in: str
    hook_out: str
    activation: Activation = "relu"
    k: int | None = None
    model_name: str = ""
    skip: bool = False
    topk_relu: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if min(self.d_in, self.d_sae, self.d_out) <= 0:
            raise ValueError(f"widths must be positive, got d_in={self.d_in} d_sae={self.d_sae} d_out={self.d_out}")
        if self.activation == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ValueError(f"a TopK dictionary needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.activation == "jumprelu" and self.k is not None and not 0 < self.k <= self.d_sae:
            raise ValueError(f"a JumpReLU dictionary's BatchTopK target needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.activation == "relu" and self.k is not None:
            raise ValueError("k is only meaningful for activation='topk' or 'jumprelu'; leave it None for 'relu'")
        if self.skip and self.kind != "transcoder":
            raise ValueError("only a transcoder can have a skip connection (W_skip); set skip=False")
        if not self.topk_relu and self.activation != "topk":
            raise ValueError("topk_relu=False only applies to activation='topk'")
        if self.kind != "transcoder" and (self.hook_in != self.hook_out or self.d_in != self.d_out):
            raise ValueError(f"an SAE reads and writes one hook with one width; got {self.hook_in}->{self.hook_out}")

    @property
    def name(self) -> str:
        return f"{'attn' if self.kind == 'attn_sae' else 'mlp' if self.kind == 'transcoder' else 'sae'}{self.layer}"

    @classmethod
    def attn_sae(cls, layer: int, d_in: int, d_sae: int, **kw: Any) -> "DictionarySpec":
        hook = attn_hook(layer)
        return cls("attn_sae", layer, d_in, d_sae, d_in, hook, hook, **kw)

    @classmethod
    def transcoder(cls, layer: int, d_model: int, d_sae: int, **kw: Any) -> "DictionarySpec":
        hook_in, hook_out = transcoder_hooks(layer)
        return cls("transcoder", layer, d_model, d_sae, d_model, hook_in, hook_out, **kw)


class _KeepTopK(torch.nn.Module):
    """circuit-tracer's TopK: the k largest pre-activations kept as they are (negative ones too), the rest 0."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        vals, idx = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, idx, vals)


def _topk_transcoder_classes(skip: bool = False):
    """TopK transcoders for sae-lens, which ships ReLU/JumpReLU transcoders only; registered on first use.

    ``topk_transcoder`` and ``topk_skip_transcoder`` (with sae-lens's ``W_skip``), each with ``k`` and
    ``topk_relu`` in the config (``True`` when absent, as in files written before the flag existed).
    """
    from sae_lens import SkipTranscoder, Transcoder, TranscoderConfig
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.topk_sae import TopK

    arch = "topk_skip_transcoder" if skip else "topk_transcoder"
    if arch in SAE_CLASS_REGISTRY:
        return SAE_CLASS_REGISTRY[arch]

    @dataclass
    class TopKTranscoderConfig(TranscoderConfig):
        k: int = 32
        topk_relu: bool = True

        @classmethod
        def architecture(cls) -> str:
            return arch

        def to_dict(self) -> dict[str, Any]:
            res = super().to_dict()
            res["k"], res["topk_relu"] = self.k, self.topk_relu
            return res

    base = SkipTranscoder if skip else Transcoder

    class TopKTranscoder(base):  # type: ignore[misc, valid-type]
        def get_activation_fn(self):
            return TopK(self.cfg.k) if self.cfg.topk_relu else _KeepTopK(self.cfg.k)

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]):
            return cls(TopKTranscoderConfig.from_dict(config_dict))

    TopKTranscoderConfig.__name__ = TopKTranscoderConfig.__qualname__ = "TopKSkipTranscoderConfig" if skip else "TopKTranscoderConfig"
    TopKTranscoder.__name__ = TopKTranscoder.__qualname__ = "TopKSkipTranscoder" if skip else "TopKTranscoder"
    register_sae_class(arch, TopKTranscoder, TopKTranscoderConfig)
    return TopKTranscoder, TopKTranscoderConfig


def sae_classes(kind: str, activation: str, skip: bool = False):
    """The sae-lens (class, config class) for a kind and activation (and, for transcoders, a skip connection)."""
    import sae_lens

    if kind == "transcoder" and skip:
        return {"relu": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
                "jumprelu": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig)}.get(activation) \
            or _topk_transcoder_classes(skip=True)
    if kind == "transcoder":
        return {"relu": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
                "jumprelu": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig)}.get(activation) or _topk_transcoder_classes()
    return {"relu": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig), "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
            "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}[activation]


def build_dictionary(spec: DictionarySpec, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **metadata: Any):
    """A new sae-lens dictionary for ``spec``: decoder rows of unit norm, encoder its transpose, biases 0."""
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = sae_classes(spec.kind, spec.activation, spec.skip)
    kw: dict[str, Any] = dict(d_in=spec.d_in, d_sae=spec.d_sae, dtype=str(dtype).removeprefix("torch."), device=str(device))
    kw["apply_b_dec_to_input"] = False
    if spec.kind == "transcoder":
        kw["d_out"] = spec.d_out
    if spec.activation == "topk":
        kw["k"] = spec.k
        if spec.kind == "transcoder":
            kw["topk_relu"] = spec.topk_relu
    if spec.activation == "jumprelu" and spec.k is not None:
        metadata["batch_topk_k"] = spec.k
    meta = dict(
        hook_name=spec.hook_in, hook_name_out=spec.hook_out, kind=spec.kind, layer=spec.layer,
        model_name=spec.model_name, prepend_bos=True, **metadata,
    )
    cfg = cfg_cls(**kw, metadata=SAEMetadata(**meta))
    sae = sae_cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w_dec = torch.randn(spec.d_sae, spec.d_out, generator=gen, dtype=torch.float64)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w_dec.to(dtype))
        if spec.d_in == spec.d_out:
            sae.W_enc.copy_(w_dec.T.to(dtype))
        else:
            w_enc = torch.randn(spec.d_in, spec.d_sae, generator=gen, dtype=torch.float64)
            sae.W_enc.copy_((w_enc / w_enc.norm(dim=0, keepdim=True)).to(dtype))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if spec.activation == "jumprelu":
            sae.threshold.zero_()  # set by training (saes/train.py)
            sae.threshold.requires_grad_(False)
        if spec.skip:
            sae.W_skip.zero_()
    return sae.to(device)


ARCHITECTURES = {"standard": "relu", "transcoder": "relu", "topk": "topk", "topk_transcoder": "topk",
                 "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu", "skip_transcoder": "relu",
                 "topk_skip_transcoder": "topk", "jumprelu_skip_transcoder": "jumprelu"}  # sae-lens architecture -> activation


def spec_of(sae) -> DictionarySpec:
    """Read a dictionary's spec back from its sae-lens config and metadata."""
    cfg, meta = sae.cfg, sae.cfg.metadata
    arch = cfg.architecture()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported dictionary architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    activation = ARCHITECTURES[arch]
    if getattr(cfg, "apply_b_dec_to_input", False):
        raise ValueError("dictionary is not in canonical form (apply_b_dec_to_input=True); load it through saes.pretrained or call canonicalize()")
    kind = meta.get("kind") or ("transcoder" if "transcoder" in arch else "sae")
    hook_in = meta.get("hook_name")
    if not hook_in:
        raise ValueError("dictionary metadata has no hook_name: it does not say where it reads")
    hook_out = meta.get("hook_name_out") or hook_in
    layer = meta.get("layer")
    if layer is None:
        layer = int(hook_in.split(".")[1]) if hook_in.startswith("blocks.") else 0
    return DictionarySpec(
        kind=kind, layer=int(layer), d_in=cfg.d_in, d_sae=cfg.d_sae, d_out=getattr(cfg, "d_out", cfg.d_in),
        hook_in=hook_in, hook_out=hook_out, activation=activation,
        k=getattr(cfg, "k", None) if activation == "topk" else meta.get("batch_topk_k") if activation == "jumprelu" else None,
        model_name=meta.get("model_name") or "",
        skip=getattr(sae, "W_skip", None) is not None,
        topk_relu=bool(getattr(cfg, "topk_relu", True)) if activation == "topk" else True,
    )


def canonicalize(sae):
    """Fold ``b_dec`` out of the encoder input (``apply_b_dec_to_input``) so that ``pre = x @ W_enc + b_enc``.

    (x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc): exact up to rounding.
    """
    if getattr(sae.cfg, "apply_b_dec_to_input", False):
        with torch.no_grad():
            sae.b_enc.sub_(sae.b_dec @ sae.W_enc)
        sae.cfg.apply_b_dec_to_input = False
    return sae


def pre_activation(sae, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
    return x.to(sae.W_enc.dtype) @ sae.W_enc + sae.b_enc


def activate(sae, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
    threshold = getattr(sae, "threshold", None)
    if threshold is not None:  # JumpReLU, as sae-lens computes it
        return pre.relu() * (pre > threshold)
    k = getattr(sae.cfg, "k", None)
    if k is None:
        return torch.relu(pre)
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu() if getattr(sae.cfg, "topk_relu", True) else vals)


def encode(sae, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
    return activate(sae, pre_activation(sae, x))


def decode(sae, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
    return acts @ sae.W_dec + sae.b_dec


def skip_term(sae, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"] | None:
    """A skip transcoder's linear path ``x @ W_skip.T``; None for a dictionary without one."""
    w_skip = getattr(sae, "W_skip", None)
    return None if w_skip is None else x.to(w_skip.dtype) @ w_skip.T


def reconstruct(sae, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    """The dictionary's output: ``decode(encode(x))``, plus the skip path where there is one."""
    out = decode(sae, encode(sae, x))
    skip = skip_term(sae, x)
    return out if skip is None else out + skip
