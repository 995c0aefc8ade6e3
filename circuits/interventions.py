"""Interventions: set, scale or shift nodes of a circuit, and read what the target, other nodes and the logits do.

Algorithm (circuit-tracer's ``feature_intervention`` is the model for the interface; Marks et al. 2024 for the
dictionaries spliced into the real model with their error terms):

1. *Parse and check* every intervention ``{node: value}`` before any run. Nodes use the node-id syntax of the
   graphs (``mlp1:613@5``, ``attn2:17@5``, ``mlp1.error@5``, ``attn0.error@3``, ``mlp1.out@5``, ``embed@2``,
   ``pos_embed@2``; parsed and written by ``circuits.sites``; a position may be negative, counted from the end; a ``Node`` object or a graph's node dict is read through
   its ``id``). Values are absolute (``0``, ``2.5``, ``"-1"``), a scale of the clean activation (``"*2"``,
   ``"*0"``) or a shift (``"+0.5"``, ``"+-0.5"``). The dictionary, the feature index, the position and the
   value are checked against the suite, and the node against the clean pass: a feature must be active there
   (an inactive feature is no node of the linearised model, and scaling or shifting 0 means nothing), except that
   ``freeze="attention"`` or ``"none"`` accept an absolute value for an inactive feature (switching it on).
2. *Resolve* each value against the clean pass (``LinearisedModel``) to the activation ``a_new`` the node takes at
   its position. For error, MLP-output (``mlp1.out@5``, a layer without a transcoder) and embedding nodes the
   activation is the norm of the vector they write: a value rescales that vector by ``a_new / a_clean``, keeping
   its direction. A cross-layer transcoder's feature is set at its read layer (``mlp1:613@5`` of a CLT suite).
3. *Run* under one of three freeze modes:

   - ``"all"``: the linearised model with *every other node held at its clean activation*, attention patterns
     and LayerNorm scales frozen (``LinearisedModel.residual(chain=False)``). Only the intervened nodes' writes
     change, so every readout r (the target, a node asked for, a logit) moves by its direct effects,
     ``sum_s (a_new_s - a_s) / a_s * A[r, s]`` with ``A`` the edges of ``circuits.attribution``: an intervention
     here tests an edge of the graph, exactly (``tests/test_interventions.py``). The change travels the paths the
     edges do: through attention layers without an SAE (frozen patterns) and skip paths, and a CLT feature's
     writes into every later MLP output. An attention score is read through its linearisation
     (``targets.AttentionScoreTarget.read``), as the graph's edges into it are.
   - ``"attention"``: the real model with the dictionaries spliced in (``hook_z <- attn_sae(z) + error_z``,
     ``hook_mlp_out <- transcoder(ln2) + error``, each error from the same run, so that a run with nothing set is
     the model itself), the attention patterns frozen to the clean pass, LayerNorm and every feature live: the
     clamped feature's write changes and everything downstream is recomputed, except where attention looks.
   - ``"none"``: the same with the patterns live too: the effect of the intervention on the real model.

   A dictionary that no intervention touches is spliced as the identity (its error term cancels its
   reconstruction exactly), so it is not run; a site without a dictionary runs as the model does. A skip
   transcoder's skip path stays live (it is part of the hook's real value; a feature's change adds
   ``delta @ W_dec``). A cross-layer transcoder is spliced from the lowest layer it is intervened at: a clamped
   feature's change adds ``delta @ W_dec[L][:, T - L]`` to every MLP output ``T >= L``, and a CLT error at layer
   ``T`` is that run's MLP output minus what every layer ``<= T`` writes into it. An MLP-output node scales the
   layer's live output at its position.
4. *Read* the target (any ``circuits.targets`` spec; by default ``circuits.trace.default_target``) and every node
   asked for before and after, the same way a target is read (a feature's value is its pre-activation, read
   from its input; its activation is reported beside it), and the top logits at the target's position for a
   logit target, else at the last position.
5. *Generate* (``generate=N``, ``freeze="attention"`` or ``"none"``): N greedy tokens with and without the
   intervention. At prompt positions the intervention is the one resolved in step 2. At every generated
   position the same *feature* is clamped too: an absolute value is set there, a scale or a shift applies to the
   activation the feature has at that position in the run. Error and embedding interventions stay at their
   positions. With ``freeze="attention"`` the patterns of prompt positions stay frozen and those of generated
   positions are live (they have no clean pass).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.linear_model import LinearisedModel, skip_weight
from circuits.sites import ERROR_KINDS, FEATURE_KINDS, TOKEN_KINDS, format_node_id, parse_node_id, site_of
from circuits.targets import (AttentionScoreTarget, DirectionTarget, FeatureTarget, LogitTarget, Target,
                              parse_target, read_targets)
from circuits.trace import default_target
from saes.dictionary import encode, pre_activation
from saes.suite import Suite, flatten_z

log = logging.getLogger(__name__)

Freeze = Literal["all", "attention", "none"]
FREEZE_MODES = ("all", "attention", "none")
NODE_SYNTAX = ("node syntax: mlpL:F@P | attnL:F@P (features), mlpL.error@P | attnL.error@P (errors), "
               "mlpL.out@P (the MLP output of a layer without a transcoder), embed@P | pos_embed@P")
VALUE_SYNTAX = 'value syntax: a number (set), "*F" (scale the clean activation), "+D" or "+-D" (shift it)'

_POSITION = re.compile(r"^(?P<body>.*)@(?P<pos>-?\d+)$")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


# ------------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class NodeRef:
    """A node of the linearised model by kind, layer (-1 for embeddings), position and feature (-1 if none)."""

    kind: str
    layer: int
    pos: int
    feature: int = -1

    @property
    def id(self) -> str:
        return format_node_id(self.kind, self.layer, self.pos, self.feature)

    @property
    def is_feature(self) -> bool:
        return self.kind in FEATURE_KINDS


@dataclass(frozen=True)
class Value:
    """What a node is set to: ``op`` is ``set`` (absolute), ``scale`` or ``add``; ``text`` is the spec as given."""

    op: Literal["set", "scale", "add"]
    amount: float
    text: str

    def resolve(self, clean: float) -> float:
        return self.amount if self.op == "set" else clean * self.amount if self.op == "scale" else clean + self.amount

    def apply(self, live: Tensor) -> Tensor:
        """The value at a position without a clean pass (generated tokens): applied to the live activation."""
        return torch.full_like(live, self.amount) if self.op == "set" else live * self.amount if self.op == "scale" else live + self.amount


def parse_value(value: Any, node: str = "") -> Value:
    """A number (absolute), ``"*F"`` (scale) or ``"+D"`` / ``"+-D"`` (shift); anything else is refused."""
    where = f" for {node}" if node else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"value {value!r}{where} is not a number; {VALUE_SYNTAX}")
    if isinstance(value, (int, float)):
        op, amount, text = "set", float(value), repr(value)
    else:
        text = value.strip()
        op = {"*": "scale", "+": "add"}.get(text[:1], "set")
        body = text[1:].strip() if op != "set" else text
        if not re.fullmatch(_NUMBER, body):
            raise ValueError(f"value {value!r}{where} is not numeric; {VALUE_SYNTAX}, e.g. 0, 2.5, *0, *2, +0.5")
        amount = float(body)
    if not math.isfinite(amount):
        raise ValueError(f"value {value!r}{where} is not finite; give a finite number")
    return Value(op, amount, text)


def _position(text: str, n_pos: int, spec: str) -> int:
    p = int(text)
    if not -n_pos <= p < n_pos:
        raise ValueError(f"{spec}: position {p} is out of range: the prompt has {n_pos} tokens (with BOS), so use a "
                         f"position in 0..{n_pos - 1} (or -1..-{n_pos} counted from the end)")
    return p % n_pos


def parse_node(node: Any, suite: Suite, n_pos: int) -> NodeRef:
    """A node id (or an object with ``.id``, or a graph's node dict) checked against the suite and prompt length."""
    spec = node.get("id") if isinstance(node, Mapping) else getattr(node, "id", node)
    if not isinstance(spec, str):
        raise ValueError(f"cannot read a node from {node!r}; give a node id such as mlp1:613@5 ({NODE_SYNTAX})")
    spec = spec.strip()
    kind, layer, pos_text = _split_node(spec)
    n_layers = suite.model.cfg.n_layers
    pos = _position(pos_text, n_pos, spec)
    if kind in TOKEN_KINDS:
        return NodeRef(kind, -1, pos)
    if not 0 <= layer < n_layers:
        raise ValueError(f"{spec}: layer {layer} does not exist: the model has {n_layers} layers, use 0..{n_layers - 1}")
    have = ", ".join(suite.dictionaries()) or "no per-layer dictionaries"
    if suite.clt is not None:
        have += " and a cross-layer transcoder"
    family = site_of(kind, layer).family
    if kind == "mlp_output":
        if layer in suite.transcoders or suite.clt is not None:
            raise ValueError(f"{spec}: layer {layer} has a transcoder, so its MLP output is no node; intervene on its "
                             f"features or on mlp{layer}.error@{pos}")
        return NodeRef(kind, layer, pos)
    if family == "mlp" and suite.clt is not None and layer not in suite.transcoders:
        d_sae = suite.clt.cfg.d_sae
    else:
        found = (suite.attn_saes if family == "attn" else suite.transcoders).get(layer)
        if found is None:
            hint = f"; its MLP output is the node mlp{layer}.out@{pos}" if family == "mlp" else ""
            raise ValueError(f"{spec}: the suite has no {family} dictionary at layer {layer}; it has {have}{hint}")
        d_sae = found.cfg.d_sae
    ref = NodeRef(kind, layer, pos, -1 if kind in ERROR_KINDS else _feature_of(spec))
    if ref.is_feature and not 0 <= ref.feature < d_sae:
        raise ValueError(f"{spec}: feature {ref.feature} is out of range for {family}{layer}, which has {d_sae} "
                         f"features: use 0..{d_sae - 1}")
    return ref


def _split_node(spec: str) -> tuple[str, int, str]:
    """(kind, layer, position text) of a node id whose position may be negative (``circuits.sites`` syntax)."""
    check_node_syntax(spec)
    m = _POSITION.match(spec)
    kind, layer, _, _ = parse_node_id(f"{m.group('body')}@0")
    return kind, layer, m.group("pos")


def _feature_of(spec: str) -> int:
    return parse_node_id(f"{_POSITION.match(spec).group('body')}@0")[3]


def check_node_syntax(spec: str) -> None:
    """Raise the parse error of :func:`parse_node` for text that is no node id, without a suite (for early checks)."""
    spec = spec.strip()
    m = _POSITION.match(spec)
    if m is not None:
        try:
            parse_node_id(f"{m.group('body')}@0")
            return
        except ValueError as e:
            if "only an MLP output" in str(e):
                raise ValueError(f"cannot parse node {spec!r}: only an MLP output is a node (mlpL.out@P); {NODE_SYNTAX}") from None
    hint = " (a node needs its position: add @P)" if re.match(r"^(attn|mlp)\d+(:\d+|\.error|\.out)$|^(pos_)?embed$", spec) else ""
    raise ValueError(f"cannot parse node {spec!r}{hint}; {NODE_SYNTAX}")


# ------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Intervention:
    """One resolved intervention: ``clean`` and ``new`` are the node's activation before and after (norms for
    error and embedding nodes)."""

    node: str
    value: str
    op: str
    clean: float
    new: float


@dataclass(frozen=True)
class Readout:
    """A scalar read before and after; for a feature also its activation (``None`` for other readouts)."""

    spec: str
    clean: float
    intervened: float
    activation_clean: float | None = None
    activation_intervened: float | None = None

    @property
    def change(self) -> float:
        return self.intervened - self.clean


@dataclass(frozen=True)
class TopLogit:
    token: str
    token_id: int
    logit: float
    prob: float


@dataclass(frozen=True)
class Generation:
    """``n`` greedy tokens after the prompt, without and with the intervention."""

    n: int
    clean: str
    intervened: str
    clean_ids: tuple[int, ...]
    intervened_ids: tuple[int, ...]


@dataclass(frozen=True)
class InterventionResult:
    model: str
    prompt: str
    tokens: tuple[str, ...]
    freeze: str
    interventions: tuple[Intervention, ...]
    target: Readout
    nodes: tuple[Readout, ...]
    logit_pos: int
    top_logits_clean: tuple[TopLogit, ...]
    top_logits_intervened: tuple[TopLogit, ...]
    generation: Generation | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``target`` and each entry of ``nodes`` (keyed by spec) hold ``clean`` and ``intervened``."""

        def readout(r: Readout) -> dict[str, Any]:
            d = {"spec": r.spec, "clean": r.clean, "intervened": r.intervened, "change": r.change}
            if r.activation_clean is not None:
                d["activation"] = {"clean": r.activation_clean, "intervened": r.activation_intervened}
            return d

        return {
            "schema": 1, "model": self.model, "prompt": self.prompt, "tokens": list(self.tokens), "freeze": self.freeze,
            "interventions": [asdict(i) for i in self.interventions],
            "target": readout(self.target),
            "nodes": {r.spec: readout(r) for r in self.nodes},
            "top_logits": {"position": self.logit_pos,
                           "clean": [asdict(t) for t in self.top_logits_clean],
                           "intervened": [asdict(t) for t in self.top_logits_intervened]},
            "generation": None if self.generation is None else {**asdict(self.generation),
                                                               "clean_ids": list(self.generation.clean_ids),
                                                               "intervened_ids": list(self.generation.intervened_ids)},
        }


# ------------------------------------------------------------------------------------------------ the clean pass
@dataclass(frozen=True)
class _Resolved:
    ref: NodeRef
    value: Value
    clean: float  # activation in the clean pass (0 for an inactive feature; a norm for vector nodes)
    new: float
    group: int  # index into lm.groups
    slot: int  # -1 for an inactive feature


def _locate(lm: LinearisedModel, ref: NodeRef) -> tuple[int, int, float]:
    """(group index, slot, clean activation) of a node; slot -1 if the feature is not active at that position."""
    for i, g in enumerate(lm.groups):
        if g.kind != ref.kind or g.layer != ref.layer:
            continue
        if ref.is_feature:
            hit = ((g.feature[ref.pos] == ref.feature) & g.mask[ref.pos]).nonzero()
            if len(hit) == 0:
                return i, -1, 0.0
            j = int(hit[0, 0])
        else:
            j = 0
        return i, j, float(g.activation[ref.pos, j])
    raise ValueError(f"{ref.id}: the linearised model has no {ref.kind} nodes at layer {ref.layer}")


def _parse_interventions(interventions, suite: Suite, n_pos: int) -> list[tuple[NodeRef, Value]]:
    """Step 1 without the clean pass: syntax, dictionaries, feature indices, positions, values, duplicates."""
    pairs = list(interventions.items() if isinstance(interventions, Mapping) else interventions)
    if not pairs:
        raise ValueError("no intervention was given; set at least one node, e.g. {'mlp1:613@5': 0}")
    out, seen = [], set()
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"interventions must map nodes to values, or be (node, value) pairs; got {pair!r}")
        node, value = pair
        ref = parse_node(node, suite, n_pos)
        val = parse_value(value, ref.id)
        if ref.id in seen:
            raise ValueError(f"{ref.id} is set twice; give one value per node")
        seen.add(ref.id)
        out.append((ref, val))
    return out


def _resolve(lm: LinearisedModel, parsed: list[tuple[NodeRef, Value]], freeze: str) -> list[_Resolved]:
    """Step 1 against the clean pass (is the node there?) and step 2 (the value as an activation)."""
    out = []
    for ref, val in parsed:
        group, slot, clean = _locate(lm, ref)
        if ref.is_feature and slot < 0:
            if freeze == "all":
                raise ValueError(f"{ref.id} is not active in the clean pass (its activation is 0 at position {ref.pos}), so "
                                 "it is no node of the linearised model; choose an active feature (a node of the graph), "
                                 "or switch it on with an absolute value and freeze='attention' or 'none'")
            if val.op != "set":
                raise ValueError(f"{ref.id} is not active in the clean pass (its activation is 0 at position {ref.pos}), "
                                 f"so {val.text} changes nothing; give an absolute value to switch it on")
        if not ref.is_feature and clean == 0:
            raise ValueError(f"{ref.id} writes a zero vector in the clean pass, so it has no direction to scale")
        new = val.resolve(clean)
        if not ref.is_feature and new < 0:
            raise ValueError(f"{ref.id}: the activation of an error or embedding node is the norm of its vector, so "
                             f"{val.text} (giving {new:g}) is refused; use *-1 to flip the vector")
        out.append(_Resolved(ref, val, clean, new, group, slot))
    return out


def _check_options(freeze: str, top_k: int, generate: int, cfg, n_pos: int) -> None:
    if freeze not in FREEZE_MODES:
        raise ValueError(f"freeze must be one of {', '.join(FREEZE_MODES)}, got {freeze!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cfg.d_vocab:
        raise ValueError(f"top_k must be an integer in 1..{cfg.d_vocab}, got {top_k!r}")
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise ValueError(f"generate must be an integer >= 0, got {generate!r}")
    if generate and freeze == "all":
        raise ValueError("generate needs freeze='attention' or 'none': the linearised model is frozen at the "
                         "prompt's clean pass and has nothing to freeze at generated positions")
    if n_pos + generate > cfg.n_ctx:
        raise ValueError(f"generate={generate} after {n_pos} prompt tokens exceeds the context of {cfg.n_ctx}; "
                         f"use at most {cfg.n_ctx - n_pos}")


# ------------------------------------------------------------------------------------------------ freeze="all"
def _frozen_effects(lm: LinearisedModel, resolved: list[_Resolved], readouts: list[Target],
                    logit_pos: int) -> tuple[Float[Tensor, "r"], Float[Tensor, "d_vocab"]]:
    """Changes of the readouts and of the logits at ``logit_pos`` with only the intervened nodes' writes changed.

    Every reader is affine in the residual stream, so its change is its reading of the residual that the *changes*
    alone write, minus its reading of a zero residual: no cancellation against the clean value. A change reaches
    later readers also through the linear stages (attention layers without an SAE, with their patterns frozen, and
    skip paths), and a cross-layer transcoder's feature writes into every later MLP stage too: the same paths as
    the graph's edges.
    """
    d_model = lm.cfg.d_model
    change = torch.zeros(lm.final_stage, lm.n_pos, d_model, dtype=lm.dtype, device=lm.device)  # by stage written
    for r in resolved:
        g = lm.groups[r.group]
        act = torch.zeros(1, lm.n_pos, g.width, dtype=lm.dtype, device=lm.device)
        act[0, r.ref.pos, r.slot] = r.new - r.clean
        change[g.stage] += lm.write(g, act)[0]
        for i, stage, dirs in lm.extra_writes:
            if i == r.group:
                change[stage] += torch.einsum("bpm,pmd->pd", act, dirs)
    resid = torch.zeros(1, lm.n_pos, d_model, dtype=lm.dtype, device=lm.device)
    below = [resid]  # below[t]: what the changes write into the residual read at stage t
    for stage in range(lm.final_stage):
        writes = change[stage][None]
        if stage in lm.linear_stages:  # linear without its constant: it passes the changes on
            writes = writes + lm.pass_through(stage, resid)
        resid = resid + writes
        below.append(resid)
    zero = torch.zeros(1, lm.n_pos, d_model, dtype=lm.dtype, device=lm.device)
    out = []
    for t in readouts:
        resid = below[t.stage(lm)]
        out.append((read_targets(lm, [t], resid) - read_targets(lm, [t], zero))[0])
    logits = lm.logits_from(below[lm.final_stage])[0, logit_pos] - lm.logits_from(zero)[0, logit_pos]
    return torch.stack(out), logits


# ------------------------------------------------------------------------------------------------ live runs
@dataclass
class _Run:
    logits: Float[Tensor, "pos d_vocab"]
    seen: dict[str, Tensor] = field(default_factory=dict)  # hook inputs before any splice, batch axis dropped
    acts: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # activations used at clamped dictionaries


def _spliced_run(lm: LinearisedModel, tokens: Int[Tensor, "1 pos"], resolved: list[_Resolved], freeze: str,
                 capture: set[str]) -> _Run:
    """One forward pass of the real model with the intervened dictionaries spliced in (step 3 of the module doc).

    Positions from ``lm.n_pos`` on are generated ones: there each intervened feature takes ``Value.apply`` of its
    live activation. The hooks in ``capture`` are recorded before any splice at the same hook.
    """
    model, suite, n_prompt = lm.model, lm.suite, lm.n_pos
    run = _Run(logits=torch.empty(0))
    by_dict: dict[tuple[str, int], list[_Resolved]] = {}
    scales: dict[str, list[_Resolved]] = {}
    clt = suite.clt
    for r in resolved:
        if r.ref.is_feature:
            by_dict.setdefault((r.ref.kind, r.ref.layer), []).append(r)
        else:
            family = "attn_feature" if r.ref.kind == "attn_error" else "mlp_feature"
            if r.ref.kind in ERROR_KINDS:
                by_dict.setdefault((family, r.ref.layer), [])
            scales.setdefault(r.ref.kind if r.ref.layer < 0 else f"{r.ref.kind}{r.ref.layer}", []).append(r)
    # A cross-layer transcoder is spliced from the lowest layer it is intervened at up: a feature clamped at its
    # read layer changes every later MLP output it writes into, and an error needs every layer's reconstruction.
    clt_layers = [layer for kind, layer in by_dict if kind == "mlp_feature"] if clt is not None else []
    clt_from = min(clt_layers) if clt_layers else None
    clt_deltas: dict[int, Tensor] = {}  # read layer -> (new - live) activations of its clamped features

    def set_values(acts: Tensor, items: list[_Resolved]) -> Tensor:
        new = acts.clone()
        for r in items:
            new[r.ref.pos, r.ref.feature] = r.new
            if new.shape[0] > n_prompt:
                new[n_prompt:, r.ref.feature] = r.value.apply(acts[n_prompt:, r.ref.feature])
        return new

    def splice_clt(layer: int, out: Tensor) -> Tensor:
        """``out`` with every clamped CLT feature of layers <= ``layer`` writing its change into it, and this
        layer's error scaled (the error of this run: ``out`` minus what every layer <= this one writes)."""
        x = run.seen[f"blocks.{layer}.ln2.hook_normalized"]
        if ("mlp_feature", layer) in by_dict:
            acts = clt.encode(layer, x)
            new = set_values(acts, [r for r in by_dict[("mlp_feature", layer)] if r.ref.is_feature])
            run.acts[("mlp_feature", layer)] = new
            clt_deltas[layer] = new - acts
        for src, delta in clt_deltas.items():
            out = out + delta @ clt.W_dec[src][:, layer - src]
        errors = scales.get(f"mlp_error{layer}", [])
        if errors:
            acts = {l: run.acts.get(("mlp_feature", l), clt.encode(l, run.seen[f"blocks.{l}.ln2.hook_normalized"]))
                    for l in range(layer + 1)}
            recon = clt.b_dec[layer] + sum(acts[l] @ clt.W_dec[l][:, layer - l] for l in range(layer + 1))
            error = out - recon
            for r in errors:
                out[r.ref.pos] = out[r.ref.pos] + (r.new / r.clean - 1) * error[r.ref.pos]
        return out

    def clamp(kind: str, layer: int, x: Tensor, out: Tensor) -> Tensor:
        """``out`` (the real hook value) with the dictionary spliced in and its interventions applied.

        ``decode(new) + error`` with ``error = out - decode(acts)`` is ``out + (new - acts) @ W_dec``: written that way,
        an unchanged feature changes nothing, bit for bit.
        """
        sae = suite.attn_saes[layer] if kind == "attn_feature" else suite.transcoders[layer]
        acts = encode(sae, x)
        new = set_values(acts, by_dict[(kind, layer)])
        run.acts[(kind, layer)] = new
        out = out + (new - acts) @ sae.W_dec  # a skip transcoder's skip path stays in ``out``, live
        error_kind = "attn_error" if kind == "attn_feature" else "mlp_error"
        for r in scales.get(f"{error_kind}{layer}", []):
            error = out - (new @ sae.W_dec + sae.b_dec)  # the error term of this run at the node's position
            if kind == "mlp_feature" and skip_weight(sae) is not None:  # the skip path is no part of the error
                error = error - x @ skip_weight(sae).T
            out[r.ref.pos] = out[r.ref.pos] + (r.new / r.clean - 1) * error[r.ref.pos]
        return out

    def record(x, hook):
        run.seen[hook.name] = x[0].detach().clone()

    def splice_z(z, hook):
        layer = hook.layer()
        flat = flatten_z(z[0])
        return clamp("attn_feature", layer, flat, flat.clone()).reshape(z.shape)

    def splice_mlp(out, hook):
        layer = hook.layer()
        if clt is not None:
            return splice_clt(layer, out[0].clone())[None]
        return clamp("mlp_feature", layer, run.seen[f"blocks.{layer}.ln2.hook_normalized"], out[0].clone())[None]

    def scale_output(out, hook):  # an MLP output node: the layer's live output scaled at its position
        out = out.clone()
        for r in scales.get(f"mlp_output{hook.layer()}", []):
            out[:, r.ref.pos] *= r.new / r.clean
        return out

    def scale_embed(x, hook):
        x = x.clone()
        for r in scales.get("embed" if hook.name == "hook_embed" else "pos_embed", []):
            x[:, r.ref.pos] *= r.new / r.clean
        return x

    def frozen_pattern(p, hook):
        p = p.clone()
        p[:, :, :n_prompt, :n_prompt] = lm.patterns[hook.layer()]  # rows of generated positions stay live
        return p

    need = set(capture)
    mlp_layers = {layer for kind, layer in by_dict if kind == "mlp_feature"}
    if clt_from is not None:  # every layer from the lowest clamped one up; an error reads every layer below it
        mlp_layers = set(range(clt_from, lm.n_layers))
        need |= {f"blocks.{layer}.ln2.hook_normalized" for layer in range(lm.n_layers)}
    need |= {f"blocks.{layer}.ln2.hook_normalized" for layer in mlp_layers}
    hooks = [(name, record) for name in sorted(need)]  # first, so they see the values before any splice
    hooks += [(f"blocks.{layer}.attn.hook_z", splice_z) for kind, layer in by_dict if kind == "attn_feature"]
    hooks += [(f"blocks.{layer}.hook_mlp_out", splice_mlp) for layer in sorted(mlp_layers)]
    hooks += [(f"blocks.{layer}.hook_mlp_out", scale_output)
              for layer in sorted({r.ref.layer for r in resolved if r.ref.kind == "mlp_output"})]
    hooks += [(name, scale_embed) for name in ("hook_embed", "hook_pos_embed") if name[5:] in scales]
    if freeze == "attention":
        hooks += [(f"blocks.{layer}.attn.hook_pattern", frozen_pattern) for layer in range(lm.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):  # hooks are removed on exit, also on error
        run.logits = model(tokens)[0]
    return run


def _input_hook(t: FeatureTarget) -> str:
    return f"blocks.{t.layer}.attn.hook_z" if t.kind == "attn_feature" else f"blocks.{t.layer}.ln2.hook_normalized"


def _hooks_read(t: Target) -> set[str]:
    if isinstance(t, FeatureTarget):
        return {_input_hook(t)}
    if isinstance(t, AttentionScoreTarget):
        return {f"blocks.{t.layer}.attn.hook_attn_scores"}
    if isinstance(t, DirectionTarget):
        return {t.hook}
    return set()


def _read_live(lm: LinearisedModel, t: Target, run: _Run) -> float:
    if isinstance(t, LogitTarget):
        return float(sum(c * run.logits[t.pos, tok] for tok, c in zip(t.tokens, t.coefficients)))
    if isinstance(t, AttentionScoreTarget):
        return float(run.seen[f"blocks.{t.layer}.attn.hook_attn_scores"][t.head, t.query_pos, t.key_pos])
    if isinstance(t, DirectionTarget):
        x = run.seen[t.hook]
        x = flatten_z(x) if t.hook.endswith("hook_z") else x
        return float(x[t.pos] @ torch.tensor(t.direction, dtype=x.dtype, device=x.device))
    x = _feature_input(run, t)
    return float(pre_activation(lm.dictionary(t.kind, t.layer), x[t.pos])[t.feature])


def _feature_input(run: _Run, t: FeatureTarget) -> Tensor:
    x = run.seen[_input_hook(t)]
    return flatten_z(x) if t.kind == "attn_feature" else x


def _live_activation(lm: LinearisedModel, t: FeatureTarget, run: _Run) -> float:
    used = run.acts.get((t.kind, t.layer))
    if used is not None:
        return float(used[t.pos, t.feature])
    return float(encode(lm.dictionary(t.kind, t.layer), _feature_input(run, t)[t.pos])[t.feature])


def _greedy(lm: LinearisedModel, resolved: list[_Resolved], freeze: str, n: int) -> tuple[int, ...]:
    tokens = lm.tokens
    for _ in range(n):
        logits = _spliced_run(lm, tokens, resolved, freeze, set()).logits
        tokens = torch.cat([tokens, logits[-1].argmax().view(1, 1)], dim=1)
    return tuple(int(t) for t in tokens[0, lm.n_pos:])


# ------------------------------------------------------------------------------------------------ the call
def _top(lm: LinearisedModel, logits: Float[Tensor, "d_vocab"], k: int) -> tuple[TopLogit, ...]:
    probs = torch.softmax(logits.double(), -1)
    vals, idx = logits.topk(k)
    tok = lm.model.tokenizer
    return tuple(TopLogit(tok.decode([int(i)]), int(i), float(v), float(probs[i])) for v, i in zip(vals, idx))


def _activation_clean(lm: LinearisedModel, t: FeatureTarget) -> float:
    x = lm.cache[_input_hook(t)][t.pos]
    x = flatten_z(x) if t.kind == "attn_feature" else x
    return float(encode(lm.dictionary(t.kind, t.layer), x.to(lm.dtype))[t.feature])


def intervene(suite: Suite, prompt: str, interventions: Mapping[Any, Any] | list[tuple[Any, Any]], freeze: Freeze = "all",
              target: str | Target | None = None, nodes: tuple | list = (), top_k: int = 10,
              generate: int = 0, lm: LinearisedModel | None = None) -> InterventionResult:
    """Set, scale or shift nodes and read the target, the ``nodes`` asked for and the top logits (module docstring).

    ``interventions`` maps node ids (or objects with ``.id``) to values: a number, ``"*F"`` or ``"+D"``; a list of
    (node, value) pairs also serves, for nodes that are not hashable (a graph's node dicts).
    ``nodes`` are target specs to read (node ids of features are target specs). ``lm``, if given, must be the
    linearised model of ``prompt`` (saves the clean pass when intervening repeatedly on one prompt).
    """
    with torch.no_grad():  # nothing here is differentiated; model parameters may require grad
        return _intervene(suite, prompt, interventions, freeze, target, nodes, top_k, generate, lm)


def _intervene(suite, prompt, interventions, freeze, target, nodes, top_k, generate, lm) -> InterventionResult:
    tokens = suite.tokens(prompt)
    n_pos = tokens.shape[1]
    # Everything that can be checked without the clean pass is checked first.
    _check_options(freeze, top_k, generate, suite.model.cfg, n_pos)
    parsed = _parse_interventions(interventions, suite, n_pos)
    if isinstance(target, str):
        target = parse_target(target, suite, n_pos)
    readouts = [parse_target(n, suite, n_pos) if isinstance(n, str) else n for n in nodes]
    for t in readouts + [target]:
        if isinstance(t, FeatureTarget) and t.head is not None:
            raise ValueError(f"{t.spec}: a readout restricted to one head is not supported; read the whole feature")
    if lm is None:
        lm = LinearisedModel(suite, tokens)
    elif lm.suite is not suite or not torch.equal(lm.tokens, tokens):
        raise ValueError("lm is the linearised model of another suite or prompt; build it from this prompt")
    resolved = _resolve(lm, parsed, freeze)
    if target is None:
        target = default_target(lm)  # the trace pipeline's own default
    readouts = [target] + readouts
    logit_pos = target.pos if isinstance(target, LogitTarget) else lm.n_pos - 1
    clean = [t.clean_value(lm) for t in readouts]
    clean_logits = lm.clean_logits[logit_pos]

    if freeze == "all":
        moved, dlogits = _frozen_effects(lm, resolved, readouts, logit_pos)
        after = [c + float(m) for c, m in zip(clean, moved)]
        logits_after = clean_logits + dlogits
        set_to = {(r.ref.kind, r.ref.layer, r.ref.pos, r.ref.feature): r.new for r in resolved}
        act_after = lambda t, a: set_to.get((t.kind, t.layer, t.pos, t.feature), a)
    else:
        capture = set().union(*(_hooks_read(t) for t in readouts))
        run = _spliced_run(lm, lm.tokens, resolved, freeze, capture)
        after = [_read_live(lm, t, run) for t in readouts]
        logits_after = run.logits[logit_pos]
        act_after = lambda t, a: _live_activation(lm, t, run)

    def readout(t: Target, c: float, a: float) -> Readout:
        if not isinstance(t, FeatureTarget):
            return Readout(t.spec, c, a)
        act = _activation_clean(lm, t)
        return Readout(t.spec, c, a, act, act_after(t, act))

    results = [readout(t, c, a) for t, c, a in zip(readouts, clean, after)]
    generation = None
    if generate:
        tok = lm.model.tokenizer
        plain = _greedy(lm, [], freeze, generate)
        held = _greedy(lm, resolved, freeze, generate)
        generation = Generation(generate, tok.decode(list(plain)), tok.decode(list(held)), plain, held)
    result = InterventionResult(
        model=suite.name, prompt=prompt, tokens=tuple(lm.token_strings()), freeze=freeze,
        interventions=tuple(Intervention(r.ref.id, r.value.text, r.value.op, r.clean, r.new) for r in resolved),
        target=results[0], nodes=tuple(results[1:]), logit_pos=logit_pos,
        top_logits_clean=_top(lm, clean_logits, top_k), top_logits_intervened=_top(lm, logits_after, top_k),
        generation=generation,
    )
    log.info("intervention (%s) on %s: %s %.4g -> %.4g", freeze, ", ".join(i.node for i in result.interventions),
             result.target.spec, result.target.clean, result.target.intervened)
    return result
