"""``circuits toy`` end to end at toy sizes, and the figure writer (offline HTML; PNG through Chromium)."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.figures_export import find_chromium, save_figure


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    before = torch.get_num_threads()  # the command sets its own thread count
    yield
    torch.set_num_threads(before)


def test_toy_command_writes_every_measured_quantity(tmp_path):
    from scripts.cli import main

    out = tmp_path / "toy"
    rc = main(["toy", "--out", str(out), "--steps", "40", "--batch-size", "64", "--replicas", "1", "--twenty-five-replicas", "2",
               "--dim-features", "12", "--dim-hidden", "3", "--dim-instances", "3", "--dim-batch-size", "32", "--sae-steps", "30", "--twenty-five-eval-samples", "16384", "--no-png", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    five = res["five_two"]["instances"]
    assert len(five) == 10 and five[0]["sparsity"] == 0.0 and five[-1]["sparsity"] == pytest.approx(0.95)
    for row in five:
        assert len(row["feature_norms"]) == 5 and row["n_represented"] == sum(n > 0.5 for n in row["feature_norms"])
    twenty = res["twenty_five"]["instances"]
    assert len(twenty) == 20 and all(len(r["replica_losses"]) == len(r["replica_n_represented"]) == 2 for r in twenty)
    assert all(r["eval_loss"] == min(r["replica_losses"]) for r in twenty)  # the kept replica is the lowest-loss one
    assert all(len(r["replica_excess_loss_se_relative"]) == 2 and 0.0 in r["replica_excess_loss_relative"] for r in twenty)
    checks = res["twenty_five"]["checks"]
    assert len(checks["represented_mean_over_replicas"]) == 20 and isinstance(checks["lowest_loss_count_monotone"], bool)
    assert res["config"]["dim_batch_size"] == 32
    assert set(res["dimensionality"]["checks"]["fraction_lines_all"]) == {"3/4", "2/3", "1/2", "2/5", "3/8", "1/3"}
    assert set(res["dimensionality"]["checks"]["fraction_lines_represented_only"]) == {"3/4", "2/3", "1/2", "2/5", "3/8", "1/3"}
    dims = res["dimensionality"]["instances"]
    assert len(dims) == 3 and all(len(r["feature_dimensionality"]) == 12 for r in dims)
    for key in ("sae_on_toy", "sae_on_toy_relu_l1"):
        assert len(res[key]["best_cosine_per_true_feature"]) == 5
    assert set(res["figures"]) == {"toy_five_two_arrangements", "toy_sae_directions", "toy_twenty_five_wtw",
                                   "toy_twenty_five_norms", "toy_dimensionality"}
    for files in res["figures"].values():
        assert (out / files["html"]).is_file() and files["png"] is None


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="needs Debian's chromium for the PNG screenshot")
def test_png_is_a_real_image_of_the_figure(tmp_path):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=[[0, 1], [1, 0]], colorscale="Greys"))
    files = save_figure(fig, tmp_path / "fig", width=400, height=300)
    data = files.png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (400, 300)
    assert b"plotly" in files.html.read_bytes()[:2_000_000]  # plotly.js inline: works offline
    assert len(data) > 2_000  # not a blank page


def test_toy_command_runs_only_the_asked_experiments(tmp_path):
    from scripts.cli import main

    out = tmp_path / "toy"
    rc = main(["toy", "--out", str(out), "--exp", "dimensionality", "--steps", "20", "--dim-features", "12", "--dim-hidden", "3",
               "--dim-instances", "2", "--dim-batch-size", "16", "--no-png", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiments_run"] == ["dimensionality"] and "five_two" not in res and "twenty_five" not in res
    assert list(res["figures"]) == ["toy_dimensionality"] and len(res["dimensionality"]["instances"]) == 2
