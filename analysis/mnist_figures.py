"""Plotly figures for the MNIST experiments: feature directions per epoch (Exp1/Exp2), per-digit latent
histograms with the 90th-percentile and 1/98 lines, and the images generated from each digit's key features."""

from __future__ import annotations

import math

import torch


def _epochs_to_show(n_epochs: int, max_panels: int = 8) -> list[int]:
    if n_epochs <= max_panels:
        return list(range(n_epochs))
    picks = {round(i * (n_epochs - 1) / (max_panels - 1)) for i in range(max_panels)}
    return sorted(picks)


def directions_by_epoch(per_epoch: list[dict], title: str):
    """One panel per shown epoch: each feature an arrow from the origin; colour = feature index. Dotted circle:
    the long-arrow mark (0.5)."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale
    from plotly.subplots import make_subplots

    shown = _epochs_to_show(len(per_epoch))
    cols = 4
    rows = math.ceil(len(shown) / cols)
    titles = [f"epoch {per_epoch[i]['epoch']}: {per_epoch[i]['n_long']} long, top 2 at {per_epoch[i]['top2_angle_degrees']:.0f}°, "
              f"{per_epoch[i]['n_represented']} |W<sub>j</sub>|>0.5" for i in shown]
    fig = make_subplots(rows, cols, subplot_titles=titles, horizontal_spacing=0.03, vertical_spacing=0.1)
    n = len(per_epoch[0]["arrows"])
    colours = sample_colorscale("Turbo", [j / max(1, n - 1) for j in range(n)])
    for k, i in enumerate(shown):
        r, c = k // cols + 1, k % cols + 1
        xs, ys, cs = [], [], []
        for j, (x, y) in enumerate(per_epoch[i]["arrows"]):
            fig.add_trace(go.Scatter(x=[0, x], y=[0, y], mode="lines", line=dict(color=colours[j], width=2),
                                     name=f"hidden unit {j}", legendgroup=str(j), showlegend=False,
                                     hovertext=f"unit {j}: share {per_epoch[i]['loss_shares'][j]:.3f}, |W| {per_epoch[i]['feature_norms'][j]:.2f}"), r, c)
        fig.add_shape(type="circle", x0=-0.5, y0=-0.5, x1=0.5, y1=0.5, line=dict(color="grey", width=1, dash="dot"), row=r, col=c)
        fig.update_xaxes(range=[-1.1, 1.1], showticklabels=False, row=r, col=c)
        fig.update_yaxes(range=[-1.1, 1.1], showticklabels=False, scaleanchor=f"x{k + 1 if k else ''}", row=r, col=c)
    fig.update_layout(title=dict(text=title, font=dict(size=14)), template="plotly_white")
    fig.update_annotations(font_size=11)
    return fig


def digit_histograms(normalised: torch.Tensor, digits: list[dict]):
    """Per digit, the 98 latents' mean activations normalised to sum 1; key latents in red; dashed: 90th
    percentile; dotted: 1/98 (what a latent would get if all shared equally)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_latents = normalised.shape[1]
    fig = make_subplots(2, 5, subplot_titles=[f"digit {d} ({len(digits[d]['key_features'])} keys)" for d in range(10)],
                        horizontal_spacing=0.03, vertical_spacing=0.14)
    for d in range(10):
        r, c = d // 5 + 1, d % 5 + 1
        keys = set(digits[d]["key_features"])
        colours = ["#d62728" if j in keys else "#7f7f7f" for j in range(n_latents)]
        fig.add_trace(go.Bar(x=list(range(n_latents)), y=normalised[d].tolist(), marker_color=colours, showlegend=False,
                             hovertemplate="latent %{x}: %{y:.3f}<extra></extra>"), r, c)
        fig.add_hline(y=digits[d]["percentile_90"], line=dict(dash="dash", color="black", width=1), row=r, col=c)
        fig.add_hline(y=1 / n_latents, line=dict(dash="dot", color="blue", width=1), row=r, col=c)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=dict(text="Exp3: SAE latent activation per digit, normalised to sum 1 (red: key latents; "
                                      "dashed: 90th percentile; dotted: 1/98)", font=dict(size=14)),
                      template="plotly_white", bargap=0)
    return fig


def generated_images(images: torch.Tensor, digits: list[dict]):
    """The image decoded from each digit's key latents alone, titled with what the classifier reads."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{d}: read as {digits[d]['predicted_from_image']}" + (" ✓" if digits[d]["predicted_from_image"] == d else " ✗")
              for d in range(10)]
    fig = make_subplots(2, 5, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=0.1)
    for d in range(10):
        fig.add_trace(go.Heatmap(z=images[d].numpy(), colorscale="Greys", reversescale=True, zmin=0, zmax=1, showscale=False),
                      d // 5 + 1, d % 5 + 1)
        fig.update_yaxes(scaleanchor=f"x{d + 1 if d else ''}", row=d // 5 + 1, col=d % 5 + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    n_ok = sum(r["predicted_from_image"] == r["digit"] for r in digits)
    fig.update_layout(title=f"Exp3: images from each digit's key SAE latents only; the classifier reads {n_ok}/10 as intended",
                      template="plotly_white")
    return fig
