"""Cross-layer transcoders (CLTs): a feature reads the MLP input at one layer and writes every later MLP output.

A CLT over ``n_layers`` layers (Ameisen et al. 2025, "Circuit tracing"; circuit-tracer's format) computes:

1. Read: at each layer ``L`` the input is ``x_L = blocks.L.ln2.hook_normalized`` ([..., d_model]).
2. Encode: ``pre_L = x_L @ W_enc[L] + b_enc[L]`` ([..., d_sae]), then ``acts_L = activation(pre_L)``:
   - ``relu``: ``relu(pre_L)``;
   - ``jumprelu``: ``pre_L * (pre_L > threshold[L])`` (a JumpReLU's threshold is positive in every file we accept,
     so this equals sae-lens's ``relu(pre) * (pre > threshold)``);
   - ``topk``: the ``k`` largest entries of ``pre_L`` kept, the rest zeroed. ``topk_relu`` says what happens to a
     kept entry that is negative: ``True`` (sae-lens's TopK, and this project's dictionaries) clamps it to 0,
     ``False`` (circuit-tracer's ``TopK`` module) keeps it as it is.
3. Decode: the MLP output at layer ``T`` is
   ``out_T = b_dec[T] + sum_{L <= T} acts_L @ W_dec[L][:, T - L, :]``, so a feature of source layer ``L`` has one
   decoder vector per target layer ``L..n_layers-1`` (``W_dec[L]: [d_sae, n_layers - L, d_model]``).
4. Write: ``out_T`` replaces ``blocks.T.hook_mlp_out``.

Layouts are sae-lens's (``W_enc: [d_in, d_sae]`` per layer); circuit-tracer's files store ``W_enc`` transposed
(``[d_sae, d_model]`` per layer) and are converted once, at load time (``saes/formats.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

CLTActivation = Literal["relu", "jumprelu", "topk"]
CLT_ACTIVATIONS = ("relu", "jumprelu", "topk")
CLT_WEIGHTS = "clt_weights.safetensors"
CLT_CFG = "cfg.json"


@dataclass(frozen=True)
class CLTConfig:
    """What a cross-layer transcoder is: its size, activation and where it reads and writes."""

    n_layers: int
    d_model: int
    d_sae: int
    activation: CLTActivation = "relu"
    k: int | None = None
    topk_relu: bool = True
    hook_in_template: str = "blocks.{layer}.ln2.hook_normalized"
    hook_out_template: str = "blocks.{layer}.hook_mlp_out"
    model_name: str = ""

    def __post_init__(self) -> None:
        if min(self.n_layers, self.d_model, self.d_sae) <= 0:
            raise ValueError(f"CLT sizes must be positive, got n_layers={self.n_layers} d_model={self.d_model} d_sae={self.d_sae}")
        if self.activation not in CLT_ACTIVATIONS:
            raise ValueError(f"CLT activation must be one of {CLT_ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ValueError(f"a TopK CLT needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.activation != "topk" and self.k is not None:
            raise ValueError(f"k is only meaningful for activation='topk'; leave it None for {self.activation!r}")
        for t in (self.hook_in_template, self.hook_out_template):
            if "{layer}" not in t:
                raise ValueError(f"hook templates must contain '{{layer}}', got {t!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class CrossLayerTranscoder(torch.nn.Module):
    """A CLT in canonical form. Parameters:

    - ``W_enc: [n_layers, d_model, d_sae]``, ``b_enc: [n_layers, d_sae]``;
    - ``W_dec``: a ``ParameterList``, ``W_dec[L]: [d_sae, n_layers - L, d_model]`` (source layer ``L`` writes to
      layers ``L..n_layers-1``, in that order);
    - ``b_dec: [n_layers, d_model]``;
    - ``threshold: [n_layers, d_sae]`` (JumpReLU only).
    """

    def __init__(self, cfg: CLTConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        n, d, f = cfg.n_layers, cfg.d_model, cfg.d_sae
        kw = dict(dtype=dtype, device=device)
        self.W_enc = torch.nn.Parameter(torch.zeros(n, d, f, **kw))
        self.b_enc = torch.nn.Parameter(torch.zeros(n, f, **kw))
        self.W_dec = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(f, n - l, d, **kw)) for l in range(n)])
        self.b_dec = torch.nn.Parameter(torch.zeros(n, d, **kw))
        if cfg.activation == "jumprelu":
            self.threshold = torch.nn.Parameter(torch.zeros(n, f, **kw), requires_grad=False)
        else:
            self.threshold = None

    # --- addresses -----------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def hook_in(self, layer: int) -> str:
        return self.cfg.hook_in_template.format(layer=layer)

    def hook_out(self, layer: int) -> str:
        return self.cfg.hook_out_template.format(layer=layer)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"this CLT has layers 0..{self.n_layers - 1}; got layer {layer}")

    # --- the computation -----------------------------------------------------------------------------
    def pre_activation(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        self._check_layer(layer)
        return x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def activate(self, layer: int, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        cfg = self.cfg
        if cfg.activation == "relu":
            return pre.relu()
        if cfg.activation == "jumprelu":
            return pre * (pre > self.threshold[layer])
        vals, idx = pre.topk(int(cfg.k), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu() if cfg.topk_relu else vals)

    def encode(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """The feature activations of source layer ``layer`` from that layer's MLP input."""
        return self.activate(layer, self.pre_activation(layer, x))

    def decode(self, acts_by_layer: Sequence[Float[Tensor, "... d_sae"]]) -> list[Float[Tensor, "... d_model"]]:
        """The MLP output of every layer: ``out[T] = b_dec[T] + sum_{L <= T} acts[L] @ W_dec[L][:, T - L]``."""
        if len(acts_by_layer) != self.n_layers:
            raise ValueError(f"decode needs the activations of all {self.n_layers} source layers, got {len(acts_by_layer)}")
        outs = [self.b_dec[t].expand(*acts_by_layer[0].shape[:-1], -1) for t in range(self.n_layers)]
        for src, acts in enumerate(acts_by_layer):
            writes = torch.einsum("...f,ftd->...td", acts.to(self.W_enc.dtype), self.W_dec[src])
            for j in range(self.n_layers - src):
                outs[src + j] = outs[src + j] + writes[..., j, :]
        return outs

    def decoder_vectors(self, src: int, feature: int) -> Float[Tensor, "n_targets d_model"]:
        """The vectors feature ``feature`` of layer ``src`` writes into layers ``src..n_layers-1``."""
        self._check_layer(src)
        return self.W_dec[src][feature]

    def forward(self, inputs: Sequence[Float[Tensor, "... d_model"]]) -> list[Float[Tensor, "... d_model"]]:
        """Reconstruct every layer's MLP output from every layer's MLP input (all ``n_layers`` of them)."""
        if len(inputs) != self.n_layers:
            raise ValueError(f"a CLT forward needs the MLP inputs of all {self.n_layers} layers, got {len(inputs)}")
        return self.decode([self.encode(l, x) for l, x in enumerate(inputs)])

    # --- files ---------------------------------------------------------------------------------------
    def flat_state(self) -> dict[str, Tensor]:
        """Named tensors for a safetensors file (``W_dec.L`` per source layer)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def save(self, directory: Path) -> Path:
        """Write ``clt_weights.safetensors`` + ``cfg.json`` (this project's layout), atomically."""
        from saes.io import atomic_save_tensors, atomic_write_json

        directory = Path(directory)
        atomic_save_tensors(self.flat_state(), directory / CLT_WEIGHTS)
        atomic_write_json(directory / CLT_CFG, {"architecture": "cross_layer_transcoder", **self.cfg.to_dict()})
        return directory


def load_clt_dir(directory: Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Load a CLT written by :meth:`CrossLayerTranscoder.save`, with every shape checked against ``cfg.json``."""
    from saes.io import read_json, read_tensors

    directory = Path(directory)
    raw = read_json(directory / CLT_CFG)
    if raw.pop("architecture", None) != "cross_layer_transcoder":
        raise ValueError(f"{directory / CLT_CFG} does not describe a cross-layer transcoder (architecture != 'cross_layer_transcoder')")
    known = set(CLTConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{directory / CLT_CFG}: unknown CLT config keys {unknown}; known: {sorted(known)}")
    clt = CrossLayerTranscoder(CLTConfig(**raw))
    state = read_tensors(directory / CLT_WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        raise ValueError(f"{directory}: CLT weights do not match cfg.json at {bad} "
                         f"(expected {[expected.get(k) for k in bad]}, found {[found.get(k) for k in bad]})")
    clt.load_state_dict(state)
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt.to(device)

