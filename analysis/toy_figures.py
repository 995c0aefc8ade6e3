"""Plotly figures for the toy models: 2-D arrangements, W^T W heatmaps, feature norms coloured by superposition,
the feature-dimensionality scatter, and the SAE's decoder directions against the true features."""

from __future__ import annotations

import math

import torch

from analysis.superposition import DIMENSION_FRACTIONS, REPRESENTED_NORM, interference

IMPORTANCE_SCALE = "Viridis"


def _grid(n_panels: int, cols: int) -> tuple[int, int]:
    return math.ceil(n_panels / cols), min(cols, n_panels)


def arrangements_2d(W: torch.Tensor, sparsities: list[float], importance: list[float], title: str):
    """One panel per sparsity: each feature's column of ``W: [sparsity, 2, n]`` drawn from the origin."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(sparsities), 5)
    fig = make_subplots(rows, cols, subplot_titles=[f"1-S = {1 - s:.3g}" for s in sparsities],
                        horizontal_spacing=0.03, vertical_spacing=0.12)
    lo, hi = min(importance), max(importance)
    colours = sample_colorscale(IMPORTANCE_SCALE, [(v - lo) / (hi - lo or 1) for v in importance])
    for k, w in enumerate(W):
        r, c = k // cols + 1, k % cols + 1
        for j in range(w.shape[1]):
            x, y = float(w[0, j]), float(w[1, j])
            fig.add_trace(go.Scatter(x=[0, x], y=[0, y], mode="lines+markers", line=dict(color=colours[j], width=3),
                                     marker=dict(size=[0, 7]), name=f"feature {j} (I={importance[j]:.2f})",
                                     legendgroup=str(j), showlegend=k == 0), r, c)
        fig.update_xaxes(range=[-1.5, 1.5], showticklabels=False, row=r, col=c)
        fig.update_yaxes(range=[-1.5, 1.5], showticklabels=False, scaleanchor=f"x{k + 1 if k else ''}", row=r, col=c)
    fig.update_layout(title=title, template="plotly_white", legend=dict(orientation="h", y=-0.05))
    return fig


def wtw_heatmaps(W: torch.Tensor, sparsities: list[float], title: str, cols: int = 4):
    """``W^T W`` per sparsity, red positive, blue negative, fixed range [-1, 1]."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(sparsities), cols)
    fig = make_subplots(rows, cols, subplot_titles=[f"S = {s:.3g}" for s in sparsities], horizontal_spacing=0.04, vertical_spacing=0.1)
    for k, w in enumerate(W):
        wtw = (w.T @ w).numpy()
        fig.add_trace(go.Heatmap(z=wtw, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, showscale=k == 0,
                                 colorbar=dict(title="W<sup>T</sup>W")), k // cols + 1, k % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def norms_by_superposition(W: torch.Tensor, sparsities: list[float], title: str, cols: int = 4):
    """The paper's bar plot: per sparsity, each feature's norm ``||W_i||`` (feature 0 on top), coloured by its
    superposition ``sum_{j != i} (W_hat_i . W_j)^2`` (dark: a dimension of its own; yellow: shared)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(sparsities), cols)
    fig = make_subplots(rows, cols, subplot_titles=[f"S = {s:.3g}" for s in sparsities], horizontal_spacing=0.05, vertical_spacing=0.1)
    for k, w in enumerate(W):
        norms, sup = w.norm(dim=0).numpy(), interference(w).clamp(0, 1).numpy()
        fig.add_trace(go.Bar(x=norms, y=list(range(w.shape[1])), orientation="h",
                             marker=dict(color=sup, cmin=0, cmax=1, colorscale="Viridis", showscale=k == 0,
                                         colorbar=dict(title="superposition")),
                             showlegend=False), k // cols + 1, k % cols + 1)
        fig.add_vline(x=REPRESENTED_NORM, line=dict(dash="dot", color="grey"), row=k // cols + 1, col=k % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(range=[0, 1.3])
    fig.update_layout(title=title, template="plotly_white", bargap=0.15)
    return fig


def dimensionality_scatter(rows: list[dict], title: str):
    """Per-feature dimensionality of every represented feature against 1/(1-S), D* as a line, fractions dashed."""
    import plotly.graph_objects as go

    fig = go.Figure()
    xs, ys = [], []
    for row in rows:
        inv = 1 / row["feature_probability"]
        for d, n in zip(row["feature_dimensionality"], row["feature_norms"]):
            if n > REPRESENTED_NORM:
                xs.append(inv * (1 + 0.04 * (len(xs) % 7 - 3) / 3))  # small horizontal jitter to show density
                ys.append(d)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(size=4, opacity=0.35, color="#1f77b4"),
                             name="feature dimensionality D<sub>i</sub>"))
    fig.add_trace(go.Scatter(x=[1 / r["feature_probability"] for r in rows], y=[r["dimensions_per_feature"] for r in rows],
                             mode="lines+markers", line=dict(color="black", width=3), name="D* = m / ||W||<sub>F</sub><sup>2</sup>"))
    for name, v in DIMENSION_FRACTIONS.items():
        fig.add_hline(y=v, line=dict(dash="dash", color="grey", width=1), annotation_text=name, annotation_position="right")
    fig.update_xaxes(type="log", title="1 / (1 - S)")
    fig.update_yaxes(title="dimensions per feature", range=[0, 1.1])
    fig.update_layout(title=title, template="plotly_white", legend=dict(x=0.6, y=1.0))
    return fig


def sae_directions(W: torch.Tensor, W_dec: torch.Tensor, best: list[float], title: str):
    """True feature directions (solid) and the SAE's unit decoder rows (dashed), in the 2-D hidden space."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for j in range(W.shape[1]):
        fig.add_trace(go.Scatter(x=[0, float(W[0, j])], y=[0, float(W[1, j])], mode="lines", line=dict(width=5),
                                 name=f"feature {j} (best cos {best[j]:.3f})"))
    d = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    for k, row in enumerate(d):
        fig.add_trace(go.Scatter(x=[0, float(row[0])], y=[0, float(row[1])], mode="lines", line=dict(dash="dash", color="black", width=1.5),
                                 name="SAE decoder rows" if k == 0 else None, showlegend=k == 0, legendgroup="dec"))
    fig.update_xaxes(range=[-1.4, 1.4])
    fig.update_yaxes(range=[-1.4, 1.4], scaleanchor="x")
    fig.update_layout(title=title, template="plotly_white", width=None)
    return fig
