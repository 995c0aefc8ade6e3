"""The sites of a circuit, named once: dictionary name <-> hooks <-> node kind <-> stage and row <-> node id.

1. A *site* is one dictionary's place in the model: ``attn{L}`` is the attention SAE on ``blocks.L.attn.hook_z``
   (its features write through ``W_O`` at stage ``2L+1``); ``mlp{L}`` is the transcoder reading
   ``blocks.L.ln2.hook_normalized`` and writing ``blocks.L.hook_mlp_out`` (stage ``2L+2``).
2. Node kinds: ``embed`` and ``pos_embed`` (stage 0), ``attn_feature`` / ``attn_error`` (the attention site),
   ``mlp_feature`` / ``mlp_error`` (the MLP site), ``mlp_output`` (a layer's whole MLP output frozen as one node,
   where there is no transcoder) and ``target``. ``KINDS`` fixes their integer codes, used in the circuit's node
   tensors and files.
3. Node ids: ``embed@5``, ``pos_embed@5``, ``attn2:17@5``, ``attn2.error@5``, ``mlp1:613@5``, ``mlp1.error@5``,
   ``mlp1.out@5``, ``target`` (:func:`format_node_id`, :func:`parse_node_id`).
4. Rows of a drawing (residual-stream stages, bottom to top): ``embeddings``, ``attn0``, ``mlp0``, ...,
   ``target``; a node's row is its stage, the target's the last row.
5. Neuronpedia ``feature_type`` of each kind (``NEURONPEDIA_FEATURE_TYPES``); the target's depends on what it is
   (see ``circuits.graph``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("embed", "pos_embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error", "mlp_output", "target")
KIND_CODE = {k: i for i, k in enumerate(KINDS)}
FEATURE_KINDS = ("attn_feature", "mlp_feature")
ERROR_KINDS = ("attn_error", "mlp_error")
TOKEN_KINDS = ("embed", "pos_embed")
#: kinds without in-edges that are neither inputs nor features: what the dictionaries leave unexplained
UNEXPLAINED_KINDS = ("attn_error", "mlp_error", "mlp_output")
TARGET_ID = "target"
FAMILIES = ("attn", "mlp")

NEURONPEDIA_FEATURE_TYPES = {
    "embed": "embedding", "pos_embed": "embedding",
    "attn_feature": "lorsa", "attn_error": "lorsa error",
    "mlp_feature": "cross layer transcoder", "mlp_error": "mlp reconstruction error",
    "mlp_output": "mlp reconstruction error",
}


@dataclass(frozen=True)
class Site:
    """One dictionary's place: ``family`` ``attn`` or ``mlp`` at ``layer``."""

    family: str
    layer: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"a site's family is 'attn' or 'mlp', got {self.family!r}")

    @property
    def name(self) -> str:
        """The dictionary name: ``attn3``, ``mlp3``."""
        return f"{self.family}{self.layer}"

    @property
    def input_hook(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z" if self.family == "attn" else f"blocks.{self.layer}.ln2.hook_normalized"

    @property
    def output_hook(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z" if self.family == "attn" else f"blocks.{self.layer}.hook_mlp_out"

    @property
    def feature_kind(self) -> str:
        return f"{self.family}_feature"

    @property
    def error_kind(self) -> str:
        return f"{self.family}_error"

    @property
    def stage(self) -> int:
        return 2 * self.layer + (1 if self.family == "attn" else 2)


def site(name: str) -> Site:
    """Parse a dictionary name (``attn3``, ``mlp0``)."""
    m = re.fullmatch(r"(attn|mlp)(\d+)", name)
    if m is None:
        raise ValueError(f"{name!r} is not a dictionary name; use attnL or mlpL, e.g. attn3 or mlp0")
    return Site(m.group(1), int(m.group(2)))


def site_of(kind: str, layer: int) -> Site:
    """The site of a feature, error or MLP-output node."""
    if kind not in KINDS or kind in TOKEN_KINDS or kind == "target":
        raise ValueError(f"node kind {kind!r} has no dictionary site")
    return Site("attn" if kind.startswith("attn") else "mlp", int(layer))


def dictionary_name(kind: str, layer: int) -> str:
    """``attn_feature``/``attn_error`` at layer 3 -> ``attn3``; ``mlp_*`` -> ``mlp3``."""
    return site_of(kind, layer).name


def stage_of(kind: str, layer: int) -> int:
    """The stage a node writes at (0 for embeddings); the target has none (its row is the last)."""
    if kind in TOKEN_KINDS:
        return 0
    return site_of(kind, layer).stage


def row_names(n_layers: int) -> list[str]:
    """``["embeddings", "attn0", "mlp0", ..., "target"]``: index = stage, the target's row last."""
    return ["embeddings"] + [f"{f}{layer}" for layer in range(n_layers) for f in FAMILIES] + ["target"]


def row_of(kind: str, layer: int, n_layers: int) -> int:
    return 2 * n_layers + 1 if kind == "target" else stage_of(kind, layer)


def format_node_id(kind: str, layer: int, pos: int, feature: int = -1) -> str:
    """The node id text (module docstring, step 3)."""
    if kind == "target":
        return TARGET_ID
    if kind in TOKEN_KINDS:
        return f"{kind}@{pos}"
    s = site_of(kind, layer).name
    if kind in ERROR_KINDS:
        return f"{s}.error@{pos}"
    if kind == "mlp_output":
        return f"{s}.out@{pos}"
    return f"{s}:{feature}@{pos}"


_ID = re.compile(r"(?:(?P<tok>embed|pos_embed)|(?P<fam>attn|mlp)(?P<layer>\d+)(?::(?P<feat>\d+)|\.(?P<part>error|out)))@(?P<pos>\d+)")


def parse_node_id(text: str) -> tuple[str, int, int, int]:
    """``(kind, layer, pos, feature)`` of a node id; layer -1 for embeddings, feature -1 where none."""
    if text == TARGET_ID:
        raise ValueError("the target's id carries no site; read its kind from the circuit")
    m = _ID.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a node id; ids look like embed@5, attn2:17@5, mlp1.error@5, mlp1.out@5")
    pos = int(m.group("pos"))
    if m.group("tok"):
        return m.group("tok"), -1, pos, -1
    fam, layer = m.group("fam"), int(m.group("layer"))
    if m.group("feat") is not None:
        return f"{fam}_feature", layer, pos, int(m.group("feat"))
    if m.group("part") == "out":
        if fam != "mlp":
            raise ValueError(f"{text!r}: only an MLP output is a node (mlpL.out@P)")
        return "mlp_output", layer, pos, -1
    return f"{fam}_error", layer, pos, -1


def feature_key(kind: str, layer: int, feature: int) -> str:
    """``{dictionary}:{feature}``, the key of a feature's card (``mlp1:613``)."""
    return f"{dictionary_name(kind, layer)}:{feature}"


def label_for(labels: dict[str, str], node_id: str) -> str | None:
    """A node's label from ``labels`` keyed by node id (``mlp1:613@5``) or, for a feature, by its feature key
    (``mlp1:613``, one label for every position); None when neither is there."""
    if node_id in labels:
        return labels[node_id]
    key, _, _ = node_id.partition("@")
    return labels.get(key) if ":" in key else None
