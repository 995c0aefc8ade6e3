"""The linearised model: one clean pass, frozen, in which everything downstream is affine in the nodes.

Algorithm (docs/attribution.md section 1; Ameisen et al. 2025 for frozen attention and LayerNorm, Ge et al. 2024
for attention-SAE nodes):

1. Run the real model once on the prompt (the *clean* pass) and cache every hook.
2. Freeze, as constants of that pass, every attention pattern (``blocks.L.attn.hook_pattern``) and every
   LayerNorm scale (``blocks.L.ln1.hook_scale``, ``blocks.L.ln2.hook_scale``, ``ln_final.hook_scale``).
3. Encode the clean ``hook_z`` (heads concatenated) with each attention SAE and the clean
   ``ln2.hook_normalized`` with each transcoder. Every feature with a non-zero activation is a *node* whose
   gate is frozen open (gradient 1); an inactive feature is not a node.
4. The reconstruction errors, ``error_z = z - attn_sae(z)`` and ``error_mlp = mlp_out - transcoder(ln2_in)``,
   are nodes too (one per layer and position), as are the token and position embeddings.
5. Every bias is a *constant*: the attention SAE's ``b_dec`` (through ``W_O``) plus ``b_O``, the
   transcoder's ``b_dec``, and inside the readers ``b_enc``, ``b_V``, ``b_Q``, ``b_K``, ``b_U`` (LayerNorm
   betas are folded into these by ``fold_ln``).
6. The residual stream is then a sum of *writes*: ``resid = sum_s a_s * d_s + sum of constant writes``,
   written in *stages* in the order of the forward pass: stage 0 the embeddings, stage ``2L+1`` attention
   layer L, stage ``2L+2`` MLP layer L. A reader at attention layer L sees stages ``< 2L+1``, one at MLP
   layer L stages ``< 2L+2``, the unembedding all ``2 n_layers + 1`` stages.
7. A suite may lack a dictionary at any site. Where a layer has no attention SAE, its attention *passes
   through*: with the pattern and the LN1 scale frozen its output is a linear map of the residual stream
   before it (``pass_through``: per head, ``W_V`` then the frozen pattern then ``W_O``) plus the constant
   ``b_O + sum_h b_V[h] W_O[h]`` (the pattern's rows sum to 1). That stage has no nodes; a reader above it
   reads every earlier write both directly and through the map (``linear_stages``, and its transpose
   ``pass_back`` in ``descend``). Where a layer has no transcoder, its whole MLP output at each position is one
   frozen node (kind ``mlp_output``), like an error node, and the stage writes no constant. A skip
   transcoder's ``x @ W_skip.T`` is another such linear map, at its MLP stage.
8. A cross-layer transcoder (``suite.clt``) replaces every MLP: a feature of layer l is a node at layer l's MLP
   stage that also writes into every later MLP output (``extra_writes``: its decoder rows into layers > l at
   their stages); each layer's error is its MLP output minus the sum of every earlier layer's writes into it.

Each node group is stored padded by position (``[pos, m]``, ``m`` the most active features at one position)
so that batched contractions never materialise a ``[batch, nodes, d_model]`` tensor. The write directions
``d_s`` (decoder rows, through ``W_O`` for attention features) are gathered once, at construction.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saes.dictionary import encode, pre_activation
from saes.suite import Suite, flatten_z

log = logging.getLogger(__name__)

NodeKind = Literal["embed", "pos_embed", "attn_feature", "attn_error", "mlp_feature", "mlp_error", "mlp_output"]
FEATURE_KINDS = ("attn_feature", "mlp_feature")


class CLTLayerView:
    """Layer ``layer`` of a cross-layer transcoder seen as one dictionary's encoder, in canonical form
    (``W_enc [d_model, d_sae]``, ``b_enc``, ``threshold``, ``cfg.d_sae``, ``cfg.k``): what readers of its features use."""

    def __init__(self, clt, layer: int):
        self.W_enc = clt.W_enc[layer]
        self.b_enc = clt.b_enc[layer]
        if clt.threshold is not None:
            self.threshold = clt.threshold[layer]
        self.cfg = clt.cfg


def skip_weight(transcoder) -> Tensor | None:
    """A skip transcoder's ``W_skip`` (``[d_out, d_in]``, sae-lens's layout: the skip term is ``x @ W_skip.T``)."""
    return getattr(transcoder, "W_skip", None) if transcoder is not None else None


def attn_stage(layer: int) -> int:
    return 2 * layer + 1


def mlp_stage(layer: int) -> int:
    return 2 * layer + 2


@dataclass
class NodeGroup:
    """The nodes one stage writes, of one kind, padded by position: entry ``[p, j]`` is a node iff ``mask[p, j]``.

    ``activation[p, j]`` is ``a_s``; the residual write of the node is ``a_s * d_s`` with ``d_s`` given by
    :meth:`LinearisedModel.unit_writes`. For embeddings and error nodes ``a_s`` is the norm of the vector they
    write and ``d_s`` its direction.
    """

    kind: NodeKind
    layer: int  # -1 for the embeddings
    stage: int
    feature: Int[Tensor, "pos m"]  # dictionary feature index; -1 for padding and for non-feature nodes
    activation: Float[Tensor, "pos m"]  # 0 at padding
    mask: Bool[Tensor, "pos m"]
    clean_pre: Float[Tensor, "pos m"]  # the clean pre-activation (features only; equals the activation)
    direction: Float[Tensor, "pos m d_model"]  # d_s: the residual write of one unit of activation

    @property
    def is_feature(self) -> bool:
        return self.kind in FEATURE_KINDS

    @property
    def n_nodes(self) -> int:
        return int(self.mask.sum())

    @property
    def width(self) -> int:
        return self.mask.shape[1]


def _pad_active(acts: Float[Tensor, "pos d_sae"], pre: Float[Tensor, "pos d_sae"]):
    """Indices of the active features at each position, padded to the largest count."""
    active = acts != 0
    m = int(active.sum(-1).max()) if acts.numel() else 0
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[:, :m]
    mask = active.gather(-1, order)
    feature = torch.where(mask, order, torch.full_like(order, -1))
    activation = torch.where(mask, acts.gather(-1, order), torch.zeros((), dtype=acts.dtype))
    clean_pre = torch.where(mask, pre.gather(-1, order), torch.zeros((), dtype=acts.dtype))
    return feature, activation, mask, clean_pre


def _vector_group(kind: NodeKind, layer: int, stage: int, vectors: Float[Tensor, "pos d_model"]) -> NodeGroup:
    norm = vectors.norm(dim=-1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    pos = vectors.shape[0]
    return NodeGroup(
        kind=kind, layer=layer, stage=stage,
        feature=torch.full((pos, 1), -1, dtype=torch.long, device=vectors.device),
        activation=norm[:, None], mask=(norm > 0)[:, None], clean_pre=torch.zeros_like(norm)[:, None],
        direction=(vectors / safe[:, None])[:, None, :],
    )


_BY_FEATURE: dict[int, tuple[int, int, Tensor]] = {}  # id(W_enc) -> (its version, its storage, W_enc.T copy)


def encoder_by_feature(sae: torch.nn.Module) -> Float[Tensor, "d_sae d_in"]:
    """A contiguous copy of ``sae.W_enc.T``, cached while that ``W_enc`` lives and is unchanged.

    The cache holds one more copy of each encoder that attribution reads (for GPT-2 small's 24 dictionaries of
    24,576 features, 1.8 GB in float32); dictionaries that share one encoder tensor share its copy. An entry is
    dropped with its ``W_enc`` and remade when ``W_enc`` is modified in place or given new storage.
    """
    W = sae.W_enc
    key = id(W)
    hit = _BY_FEATURE.get(key)
    if hit is None or hit[:2] != (W._version, W.data_ptr()):
        if hit is None:
            weakref.finalize(W, _BY_FEATURE.pop, key, None)
        hit = (W._version, W.data_ptr(), W.detach().T.contiguous())
        _BY_FEATURE[key] = hit
    return hit[2]


class LinearisedModel:
    """A suite frozen at one prompt's clean pass (see the module docstring).

    Hold it for one prompt; it keeps the clean cache, the frozen patterns and scales, and the node groups.
    """

    def __init__(self, suite: Suite, tokens: Int[Tensor, "1 pos"]):
        model = suite.model
        cfg = model.cfg
        if suite.clt is not None and suite.transcoders:
            raise ValueError(f"suite {suite.name!r} has both a cross-layer transcoder and per-layer transcoders "
                             f"({', '.join(f'mlp{l}' for l in suite.transcoders)}); keep one of them (Suite.select)")
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(f"tokens must have shape [1, pos], got {tuple(tokens.shape)}")
        self.suite, self.model, self.cfg = suite, model, cfg
        self.n_layers = cfg.n_layers
        self.final_stage = 2 * cfg.n_layers + 1
        self.tokens = tokens
        self.n_pos = tokens.shape[1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        self.cache = {k: v[0].detach() for k, v in cache.items()}  # drop the batch axis
        self.clean_logits: Float[Tensor, "pos d_vocab"] = logits[0].detach()
        self.dtype, self.device = self.clean_logits.dtype, self.clean_logits.device
        c = self.cache
        self.patterns = torch.stack([c[f"blocks.{l}.attn.hook_pattern"] for l in range(self.n_layers)])
        self.scale_ln1 = torch.stack([c[f"blocks.{l}.ln1.hook_scale"][:, 0] for l in range(self.n_layers)])
        self.scale_ln2 = torch.stack([c[f"blocks.{l}.ln2.hook_scale"][:, 0] for l in range(self.n_layers)])
        self.scale_final = c["ln_final.hook_scale"][:, 0]
        # Stages that write a linear map of the residual before them, -> their layer: an attention layer without
        # an SAE (odd stage, passed through) or a skip transcoder's W_skip path (even stage), in stage order.
        self.linear_stages: dict[int, int] = {}
        for l in range(self.n_layers):
            if l not in suite.attn_saes:
                self.linear_stages[attn_stage(l)] = l
            if skip_weight(suite.transcoders.get(l)) is not None:
                self.linear_stages[mlp_stage(l)] = l
        # Writes of a node at stages after its own (a cross-layer transcoder's decoders into later layers), filled
        # by ``_build_groups``: (group index, stage, directions [pos, m, d_model]).
        self.extra_writes: list[tuple[int, int, Tensor]] = []
        self.extra_at: dict[int, list[tuple[int, Tensor]]] = {}  # the same by stage: (group index, directions)
        self._clt_views: dict[int, CLTLayerView] = {}
        self._clt_acts: dict[int, Tensor] = {}
        self.groups: list[NodeGroup] = []
        self._build_groups()
        for i, t, dirs in self.extra_writes:
            self.extra_at.setdefault(t, []).append((i, dirs))
        self._build_table()
        self._const_writes = self._constant_writes()
        self._value_readers: dict[int, Tensor] = {}
        self._value_biases: dict[int, Tensor] = {}
        self._pass_back_maps: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ construction
    def W_O_flat(self, layer: int) -> Float[Tensor, "hd d_model"]:
        return rearrange(self.model.blocks[layer].attn.W_O, "h e d -> (h e) d")

    def _build_groups(self) -> None:
        model = self.model
        with torch.no_grad():
            self.groups.append(_vector_group("embed", -1, 0, model.W_E[self.tokens[0]]))
            self.groups.append(_vector_group("pos_embed", -1, 0, model.W_pos[: self.n_pos]))
            for layer in range(self.n_layers):
                if layer in self.suite.attn_saes:
                    self._attn_groups(layer)
                self._mlp_groups(layer)
        log.info("linearised model: %d positions, %d nodes (%d attention layers pass through, %d skip paths)", self.n_pos,
                 sum(g.n_nodes for g in self.groups), sum(t % 2 for t in self.linear_stages),
                 sum(1 - t % 2 for t in self.linear_stages))

    def _attn_groups(self, layer: int) -> None:
        """Attention-SAE features of ``layer`` and its error, written through ``W_O``."""
        sae = self.suite.attn_saes[layer]
        z = flatten_z(self.cache[f"blocks.{layer}.attn.hook_z"]).to(self.dtype)
        pre = pre_activation(sae, z)
        acts = encode(sae, z)
        feature, act, mask, clean_pre = _pad_active(acts, pre)
        direction = sae.W_dec[feature.clamp(min=0)] @ self.W_O_flat(layer) * mask[..., None]
        self.groups.append(NodeGroup("attn_feature", layer, attn_stage(layer), feature, act, mask, clean_pre, direction))
        error_z = z - (acts @ sae.W_dec + sae.b_dec)
        self.groups.append(_vector_group("attn_error", layer, attn_stage(layer), error_z @ self.W_O_flat(layer)))

    def _mlp_groups(self, layer: int) -> None:
        """Transcoder features of ``layer`` and its error; without a transcoder, the frozen MLP output."""
        out = self.cache[f"blocks.{layer}.hook_mlp_out"]
        if self.suite.clt is not None:
            self._clt_groups(layer, out)
            return
        if layer not in self.suite.transcoders:
            self.groups.append(_vector_group("mlp_output", layer, mlp_stage(layer), out))
            return
        tc = self.suite.transcoders[layer]
        x = self.cache[f"blocks.{layer}.ln2.hook_normalized"]
        pre = pre_activation(tc, x)
        acts = encode(tc, x)
        feature, act, mask, clean_pre = _pad_active(acts, pre)
        direction = tc.W_dec[feature.clamp(min=0)] * mask[..., None]
        self.groups.append(NodeGroup("mlp_feature", layer, mlp_stage(layer), feature, act, mask, clean_pre, direction))
        recon = acts @ tc.W_dec + tc.b_dec
        if skip_weight(tc) is not None:  # the skip path is linear in the residual stream: a pass-through, not error
            recon = recon + x @ skip_weight(tc).T
        self.groups.append(_vector_group("mlp_error", layer, mlp_stage(layer), out - recon))

    def _clt_groups(self, layer: int, out: Float[Tensor, "pos d_model"]) -> None:
        """A cross-layer transcoder's features of ``layer`` (writes into this layer and, as ``extra_writes``, every
        later one) and the layer's error (the MLP output minus what every layer <= this one writes into it)."""
        clt = self.suite.clt
        x = self.cache[f"blocks.{layer}.ln2.hook_normalized"]
        pre = clt.pre_activation(layer, x)
        acts = clt.encode(layer, x)
        self._clt_acts[layer] = acts
        feature, act, mask, clean_pre = _pad_active(acts, pre)
        dirs = clt.W_dec[layer][feature.clamp(min=0)] * mask[..., None, None]  # [pos, m, n_layers - layer, d_model]
        index = len(self.groups)
        self.groups.append(NodeGroup("mlp_feature", layer, mlp_stage(layer), feature, act, mask, clean_pre,
                                     dirs[:, :, 0].contiguous()))
        for j in range(1, dirs.shape[2]):
            self.extra_writes.append((index, mlp_stage(layer + j), dirs[:, :, j].contiguous()))
        recon = clt.b_dec[layer] + sum(self._clt_acts[l] @ clt.W_dec[l][:, layer - l] for l in range(layer + 1))
        self.groups.append(_vector_group("mlp_error", layer, mlp_stage(layer), out - recon))

    def _build_table(self) -> None:
        """Concatenate every group's slots, in stage order, into one node table (groups keep views into it).

        Direct effects of every node on a batch of readers are then one batched matrix product over positions,
        ``[batch, d_model] x [d_model, all slots]`` at each position, instead of one small product per group.
        """
        self.table_direction = torch.cat([g.direction for g in self.groups], dim=1)  # [pos, slots, d_model]
        self.table_activation = torch.cat([g.activation for g in self.groups], dim=1)  # [pos, slots]
        self.table_offset: list[int] = []
        stages, start = [], 0
        for g in self.groups:
            self.table_offset.append(start)
            g.direction = self.table_direction[:, start : start + g.width]
            g.activation = self.table_activation[:, start : start + g.width]
            stages.append(torch.full((g.width,), g.stage, dtype=torch.long, device=self.device))
            start += g.width
        self.table_stage = torch.cat(stages)  # [slots], non-decreasing
        if not torch.all(self.table_stage[1:] >= self.table_stage[:-1]):
            raise AssertionError("groups must be built in stage order")

    def table_dots(self, g: Float[Tensor, "batch pos d_model"], stage_limit: int) -> Float[Tensor, "batch pos slots"]:
        """``a_s d_s . g[pos_s]`` for every table slot of a stage below ``stage_limit`` (a prefix of the table)."""
        n = int((self.table_stage < stage_limit).sum())
        return einsum(g, self.table_direction[:, :n], "b p d, p m d -> b p m") * self.table_activation[:, :n]

    def _constant_writes(self) -> Float[Tensor, "stage d_model"]:
        """The bias each stage writes into the residual stream (the same at every position)."""
        out = torch.zeros(self.final_stage, self.cfg.d_model, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for layer in range(self.n_layers):
                attn = self.model.blocks[layer].attn
                if layer in self.suite.attn_saes:
                    out[attn_stage(layer)] = self.suite.attn_saes[layer].b_dec @ self.W_O_flat(layer) + attn.b_O
                else:  # passed through: b_V reaches the output through the frozen pattern, whose rows sum to 1
                    out[attn_stage(layer)] = attn.b_V.flatten() @ self.W_O_flat(layer) + attn.b_O
                if self.suite.clt is not None:
                    out[mlp_stage(layer)] = self.suite.clt.b_dec[layer]
                elif layer in self.suite.transcoders:
                    out[mlp_stage(layer)] = self.suite.transcoders[layer].b_dec
        return out

    def constant_write(self, stage: int) -> Float[Tensor, "d_model"]:
        return self._const_writes[stage]

    def groups_at(self, stage: int) -> list[tuple[int, NodeGroup]]:
        return [(i, g) for i, g in enumerate(self.groups) if g.stage == stage]

    def feature_group(self, kind: str, layer: int) -> NodeGroup:
        found = next((g for g in self.groups if g.kind == kind and g.layer == layer), None)
        if found is None:
            raise ValueError(f"the suite has no {'attention SAE' if kind.startswith('attn') else 'transcoder'} at layer "
                             f"{layer}, so there are no {kind} nodes there; it has {', '.join(self.suite.dictionaries()) or 'no dictionaries'}")
        return found

    def dictionary(self, kind: str, layer: int):
        if kind != "attn_feature" and self.suite.clt is not None:
            if layer not in self._clt_views:
                self._clt_views[layer] = CLTLayerView(self.suite.clt, layer)
            return self._clt_views[layer]
        store = self.suite.attn_saes if kind == "attn_feature" else self.suite.transcoders
        if layer not in store:
            raise ValueError(f"the suite has no {'attention SAE' if kind == 'attn_feature' else 'transcoder'} at layer {layer}; "
                             f"it has {', '.join(self.suite.dictionaries()) or 'no dictionaries'}")
        return store[layer]

    # ------------------------------------------------------------------ pass-through attention
    def pass_through(self, stage: int, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """The linear part of what a pass-through stage writes: frozen attention without its biases, or a skip
        transcoder's ``LN2(resid) @ W_skip^T``."""
        layer = self.linear_stages[stage]
        if stage % 2 == 0:
            return self.ln(resid, self.scale_ln2[layer]) @ skip_weight(self.suite.transcoders[layer]).T
        attn = self.model.blocks[layer].attn
        x = self.ln(resid, self.scale_ln1[layer])
        v = einsum(x, attn.W_V, "b k d, h d e -> b k h e")
        z = einsum(self.patterns[layer], v, "h q k, b k h e -> b q h e")
        return einsum(z, attn.W_O, "b q h e, h e d -> b q d")

    def pass_back(self, stage: int, G: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """The transpose of ``pass_through``: what a reading vector ``G`` on the stage's output reads on its input.

        Per head, ``G[q] W_O[h]^T`` at each query, spread to the keys by the frozen pattern, then ``W_V[h]^T``,
        then the adjoint of LayerNorm with a frozen scale (centre, divide by the key's scale): ``W_O`` and ``W_V``
        with heads concatenated, the pattern one head at a time (no permuted copies).
        """
        layer = self.linear_stages[stage]
        n_pos = G.shape[1]  # the first n_pos positions (later ones cannot reach readers that stop before them)
        if stage % 2 == 0:  # a skip path: W_skip^T's transpose, then LayerNorm's adjoint
            x = G @ skip_weight(self.suite.transcoders[layer])
            return (x - x.mean(-1, keepdim=True)) / self.scale_ln2[layer][:n_pos, None]
        if layer not in self._pass_back_maps:
            attn = self.model.blocks[layer].attn
            self._pass_back_maps[layer] = (self.W_O_flat(layer).detach().T.contiguous(),  # [d_model, (h e)]
                                           rearrange(attn.W_V.detach(), "h d e -> (h e) d").contiguous(),
                                           self.patterns[layer].transpose(1, 2).contiguous())  # [h, k, q]
        W_O_T, W_V_flat, pattern_T = self._pass_back_maps[layer]
        b, _, d = G.shape
        h = self.cfg.n_heads
        pattern_T = pattern_T[:, :n_pos, :n_pos]
        u = G @ W_O_T  # [b, q, (h e)]
        e = u.shape[-1] // h
        v = torch.empty_like(u)  # [b, k, (h e)]
        for i in range(h):  # one head at a time: the pattern's transpose, broadcast over the batch
            v[:, :, i * e : (i + 1) * e] = torch.matmul(pattern_T[i], u[:, :, i * e : (i + 1) * e])
        x = v @ W_V_flat
        return (x - x.mean(-1, keepdim=True)) / self.scale_ln1[layer][:n_pos, None]

    @property
    def needs_descent(self) -> bool:
        """Whether a reader's vector differs from stage to stage below it (pass-through paths, later writes)."""
        return bool(self.linear_stages or self.extra_writes)

    def descend(self, g: Float[Tensor, "batch pos d_model"], stage: Int[Tensor, "batch"],
                top: int | None = None) -> Iterator[tuple[int, Float[Tensor, "batch pos d_model"]]]:
        """Yield ``(t, G_t)`` for t from ``top - 1`` (default: the highest reader stage) down to 0.

        ``G_t[b]`` is the gradient of reader b with respect to a write at stage t, every node held fixed: reader
        b's own reading vector ``g[b]`` from its stage down, plus every path through the pass-through stages
        between t and its stage (``pass_back``). Rows of readers at a stage ``<= t`` are zero. The tensor yielded
        is updated in place after the caller has used it; copy it to keep it. ``g`` may hold only the first
        positions (up to the readers' last one): attention is causal, so nothing later reaches them.
        """
        top = int(stage.max()) if top is None else top
        G = torch.zeros_like(g)
        for t in range(top - 1, -1, -1):
            rows = (stage == t + 1).nonzero()[:, 0]
            if len(rows):
                G[rows] += g[rows]
            yield t, G
            if t in self.linear_stages:
                G += self.pass_back(t, G)

    def encoder_rows(self, kind: str, layer: int, feature: Int[Tensor, "r"]) -> Float[Tensor, "r d_in"]:
        """``W_enc[:, feature].T`` of a dictionary: the encoder columns of some features, one row each.

        ``W_enc`` is stored ``[d_in, d_sae]``, so one feature's column is ``d_in`` reads ``d_sae`` elements apart;
        gathering a few hundred of them costs more than the products they feed. The gather reads a
        feature-major copy instead, made once per dictionary and kept with it (``encoder_by_feature``).
        """
        return encoder_by_feature(self.dictionary(kind, layer)).index_select(0, feature)

    def value_reader(self, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
        """``(W_V[h] - mean over d_model of W_V[h])^T``, made once per layer and prompt.

        An attention feature with encoder slices ``w_h`` reads LN1's output through head h along ``W_V[h] w_h``;
        LayerNorm's centring, moved onto the reading side, subtracts that vector's mean, which is the same as
        reading along the centred ``W_V[h]``. So ``w_h @ value_reader(layer)[h]`` is the centred read direction.
        """
        if layer not in self._value_readers:
            W_V = self.model.blocks[layer].attn.W_V.detach()
            self._value_readers[layer] = (W_V - W_V.mean(1, keepdim=True)).transpose(1, 2).contiguous()
        return self._value_readers[layer]

    def value_biases(self, layer: int) -> Float[Tensor, "2 n_heads d_head"]:
        """What an attention feature of ``layer`` reads at every key besides the nodes, per head, as vectors that
        its encoder slices ``w_h`` are dotted with: ``b_V[h]``, and the constant writes of the stages below
        the layer read through ``value_reader`` (they are the same at every position)."""
        if layer not in self._value_biases:
            below = self._const_writes[: attn_stage(layer)].sum(0)
            self._value_biases[layer] = torch.stack([self.model.blocks[layer].attn.b_V.detach(),
                                                     self.value_reader(layer) @ below])
        return self._value_biases[layer]

    # ------------------------------------------------------------------ node writes
    def unit_dots(self, group: NodeGroup, g: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos m"]:
        """``d_s . g[pos_s]`` for every node of the group: the direct effect per unit of activation."""
        return einsum(g, group.direction, "b p d, p m d -> b p m")

    def write(self, group: NodeGroup, act: Float[Tensor, "batch pos m"]) -> Float[Tensor, "batch pos d_model"]:
        """The residual write of the group for activations ``act`` (padding has a zero direction)."""
        return einsum(act, group.direction, "b p m, p m d -> b p d")

    # ------------------------------------------------------------------ readers (affine in the residual)
    def ln(self, resid: Float[Tensor, "batch pos d_model"], scale: Float[Tensor, "pos"]) -> Float[Tensor, "batch pos d_model"]:
        """LayerNormPre with its scale frozen to the clean pass: linear in ``resid``."""
        return (resid - resid.mean(-1, keepdim=True)) / scale[:, None]

    def attn_z(self, layer: int, resid: Float[Tensor, "batch pos d_model"],
               head: int | None = None) -> Float[Tensor, "batch pos hd"]:
        """``hook_z`` (heads concatenated) through the frozen pattern; only head ``head`` if given."""
        attn = self.model.blocks[layer].attn
        x = self.ln(resid, self.scale_ln1[layer])
        v = einsum(x, attn.W_V, "b k d, h d e -> b k h e") + attn.b_V
        z = einsum(self.patterns[layer], v, "h q k, b k h e -> b q h e")
        if head is not None:
            keep = torch.zeros(z.shape[2], 1, dtype=z.dtype, device=z.device)
            keep[head] = 1
            z = z * keep
        return flatten_z(z)

    def dictionary_input(self, kind: str, layer: int, resid: Float[Tensor, "batch pos d_model"],
                         head: int | None = None) -> Float[Tensor, "batch pos d_in"]:
        if kind == "attn_feature":
            return self.attn_z(layer, resid, head)
        return self.ln(resid, self.scale_ln2[layer])

    def group_pre(self, group: NodeGroup, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos m"]:
        """Pre-activations of all the group's nodes, read from ``resid`` (the residual before their stage)."""
        sae = self.dictionary(group.kind, group.layer)
        x = self.dictionary_input(group.kind, group.layer, resid)
        idx = group.feature.clamp(min=0)
        enc = rearrange(sae.W_enc, "i f -> f i")[idx]  # [pos, m, d_in]
        return (einsum(x, enc, "b p i, p m i -> b p m") + sae.b_enc[idx]) * group.mask

    def logits_from(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.ln(resid, self.scale_final) @ self.model.W_U + self.model.b_U

    # ------------------------------------------------------------------ the linearised forward pass
    def residual(self, stage_limit: int, delta: dict[int, Tensor] | None = None, chain: bool = False,
                 batch: int = 1) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream read by a stage-``stage_limit`` reader.

        ``delta[i]`` ([batch, pos, m]) is added to group i's activations. With ``chain=False`` every node is
        held at its clean activation (direct effects); with ``chain=True`` each feature's activation is
        recomputed from the residual before its stage with its gate frozen (total effects).
        """
        delta = delta or {}
        resid = torch.zeros(batch, self.n_pos, self.cfg.d_model, dtype=self.dtype, device=self.device)
        acts: dict[int, Tensor] = {}
        for stage in range(stage_limit):
            writes = self.constant_write(stage).expand_as(resid)
            if stage in self.linear_stages:
                writes = writes + self.pass_through(stage, resid)
            for i, group in self.groups_at(stage):
                act = self.group_pre(group, resid) if (chain and group.is_feature) else group.activation.expand(batch, -1, -1)
                if i in delta:
                    act = act + delta[i]
                acts[i] = act
                writes = writes + self.write(group, act)
            for i, dirs in self.extra_at.get(stage, []):  # a cross-layer transcoder's later writes
                writes = writes + einsum(acts[i], dirs, "b p m, p m d -> b p d")
            resid = resid + writes
        return resid

    def logits(self, delta: dict[int, Tensor] | None = None, chain: bool = False,
               batch: int = 1) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the linearised model; with no ``delta`` they equal the clean logits up to rounding."""
        return self.logits_from(self.residual(self.final_stage, delta, chain, batch))

    def total_nodes(self) -> int:
        return sum(g.n_nodes for g in self.groups)

    def token_strings(self) -> list[str]:
        return [self.model.tokenizer.decode([int(t)]) for t in self.tokens[0]]
