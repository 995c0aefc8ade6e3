"""Measures of superposition for a weight matrix ``W: [n_hidden, n_features]`` whose columns are feature directions.

From Elhage et al. 2022 ("Toy Models of Superposition"):
1. Feature norm ``||W_i||``: near 1 when feature i is represented, near 0 when it is dropped. The paper counts
   a feature as represented when its norm exceeds 0.5.
2. Superposition (interference) of feature i: ``sum_{j != i} (W_hat_i . W_j)^2``, 0 when i has a dimension
   to itself.
3. Dimensions per feature ``D* = m / ||W||_F^2``: 1 when m features each hold a dimension, 1/2 for antipodal
   pairs, and so on.
4. Per-feature dimensionality ``D_i = ||W_i||^2 / sum_j (W_hat_i . W_j)^2``: the fraction of a dimension that
   feature i holds (1 alone, 1/2 in an antipodal pair, 2/5 in a pentagon, ...).
   ``feature_dimensionality_represented`` is the same with the sum over the represented features only: the
   many small columns (norm < 0.5) that a model still has near the dense end overlap every direction a little
   and pull ``D_i`` of a clean tetrahedron (3/4) or lone feature (1) down to about 0.7.
Each function takes one instance's ``W`` (``[n_hidden, n_features]``), or a batch with a leading instance axis.
"""

from __future__ import annotations

import math

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

REPRESENTED_NORM = 0.5
# The fractions the paper finds per-feature dimensionalities sticking to (Figure "feature dimensionality").
DIMENSION_FRACTIONS = {"1": 1.0, "3/4": 0.75, "2/3": 2 / 3, "1/2": 0.5, "2/5": 0.4, "3/8": 0.375, "1/3": 1 / 3}


def feature_norms(W: Float[Tensor, "... hidden feature"]) -> Float[Tensor, "... feature"]:
    return W.norm(dim=-2)


def unit_columns(W: Float[Tensor, "... hidden feature"], eps: float = 1e-8) -> Float[Tensor, "... hidden feature"]:
    return W / feature_norms(W).clamp_min(eps).unsqueeze(-2)


def interference(W: Float[Tensor, "... hidden feature"]) -> Float[Tensor, "... feature"]:
    """``sum_{j != i} (W_hat_i . W_j)^2`` per feature i."""
    overlap = einsum(unit_columns(W), W, "... hid fi, ... hid fj -> ... fi fj").pow(2)
    return overlap.sum(-1) - overlap.diagonal(dim1=-2, dim2=-1)


def dimensions_per_feature(W: Float[Tensor, "... hidden feature"]) -> Float[Tensor, "..."]:
    """``D* = m / ||W||_F^2``."""
    return W.shape[-2] / W.pow(2).sum(dim=(-2, -1))


def feature_dimensionality(W: Float[Tensor, "... hidden feature"]) -> Float[Tensor, "... feature"]:
    """``D_i = ||W_i||^2 / sum_j (W_hat_i . W_j)^2`` (the sum includes j = i)."""
    overlap = einsum(unit_columns(W), W, "... hid fi, ... hid fj -> ... fi fj").pow(2).sum(-1)
    return feature_norms(W).pow(2) / overlap.clamp_min(1e-12)


def feature_dimensionality_represented(W: Float[Tensor, "hidden feature"], min_norm: float = REPRESENTED_NORM
                                       ) -> Float[Tensor, "feature"]:
    """``D_i`` with the sum over the represented features only (``||W_j|| > min_norm``); NaN for the others."""
    rep = feature_norms(W) > min_norm
    out = torch.full(W.shape[-1:], float("nan"), dtype=W.dtype)
    if rep.any():
        out[rep] = feature_dimensionality(W[:, rep])
    return out


def antipodal_pairs(W: Float[Tensor, "hidden feature"], cosine_below: float = -0.9) -> list[tuple[int, int]]:
    """Pairs of represented features pointing in nearly opposite directions."""
    represented = torch.nonzero(feature_norms(W) > REPRESENTED_NORM).flatten().tolist()
    cos = unit_columns(W).T @ unit_columns(W)
    return [(i, j) for a, i in enumerate(represented) for j in represented[a + 1:] if float(cos[i, j]) < cosine_below]


def angular_gaps_2d(W: Float[Tensor, "2 feature"]) -> list[float]:
    """For a 2-D model: the angles (degrees) between neighbouring represented feature directions, going round.
    A regular pentagon gives five gaps of 72; an antipodal pair two of 180."""
    if W.shape[0] != 2:
        raise ValueError(f"angular_gaps_2d needs a 2-D hidden space, got W of shape {tuple(W.shape)}")
    represented = feature_norms(W) > REPRESENTED_NORM
    angles = sorted(math.degrees(math.atan2(float(y), float(x))) % 360 for x, y in W[:, represented].T)
    if len(angles) < 2:
        return []
    return [round((angles[(i + 1) % len(angles)] - angles[i]) % 360, 2) for i in range(len(angles))]


def nearest_fraction(value: float) -> tuple[str, float]:
    name = min(DIMENSION_FRACTIONS, key=lambda k: abs(DIMENSION_FRACTIONS[k] - value))
    return name, abs(DIMENSION_FRACTIONS[name] - value)


def fraction_counts(dims: list[float], tolerance: float = 0.03) -> dict[str, int]:
    """How many per-feature dimensionalities lie within ``tolerance`` of each of the paper's fractions."""
    counts = {name: 0 for name in DIMENSION_FRACTIONS}
    for d in dims:
        name, dist = nearest_fraction(d)
        if dist <= tolerance:
            counts[name] += 1
    return counts


def fraction_lines(dims: list[float], within: float = 0.005, flank: float = 0.0125) -> dict[str, dict[str, int]]:
    """A sharp cluster at each of the paper's fractions, told from a band passing through it: how many values lie
    within ``within`` of the fraction (``at``) and of the points ``flank`` below and above it (``below``, ``above``).
    A cluster has ``at`` well above both flanks; a smooth band has the three about equal."""
    def near(centre: float) -> int:
        return sum(1 for d in dims if abs(d - centre) <= within)
    return {name: {"at": near(f), "below": near(f - flank), "above": near(f + flank)}
            for name, f in DIMENSION_FRACTIONS.items() if name != "1"}


def summarize_instance(W: Float[Tensor, "hidden feature"]) -> dict:
    """Every measure of one instance, as JSON-ready lists."""
    norms = feature_norms(W)
    return {
        "feature_norms": [round(float(v), 5) for v in norms],
        "n_represented": int((norms > REPRESENTED_NORM).sum()),
        "superposition": [round(float(v), 5) for v in interference(W)],
        "dimensions_per_feature": round(float(dimensions_per_feature(W)), 5),
        "feature_dimensionality": [round(float(v), 5) for v in feature_dimensionality(W)],
        # over the represented features only (None for the others): see the module docstring
        "feature_dimensionality_represented": [None if math.isnan(v) else round(float(v), 5)
                                               for v in feature_dimensionality_represented(W).tolist()],
        "antipodal_pairs": antipodal_pairs(W),
    }
