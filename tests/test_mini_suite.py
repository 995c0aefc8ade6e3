"""The shipped mini suite loads offline and meets its quality floors on held-out text (recomputed here)."""

import pytest
import torch

from saes.suite import MINI_DIR, load_suite

FLOORS = {"l0": 40.0, "ce_loss_recovered": 0.85, "explained_variance": 0.70, "dead_fraction": 0.10}


@pytest.fixture(scope="module")
def mini():
    return load_suite("mini")


def test_mini_is_shipped_as_safetensors_within_budget():
    files = [p for p in MINI_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in (".pt", ".pkl", ".bin", ".pth")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 1 + 8 + 2  # model, 8 dictionaries, 2 extras


def test_mini_has_depth_and_every_dictionary(mini):
    assert mini.n_layers >= 4
    names = list(mini.dictionaries())
    assert names == [f"{kind}{l}" for l in range(mini.n_layers) for kind in ("attn", "mlp")]


def test_mini_meets_its_floors_on_heldout_text(mini):
    from saes.metrics import evaluate_dictionaries
    from saes.mini_suite import heldout_rows

    rows = heldout_rows(mini)
    assert len(rows) >= 100
    metrics = evaluate_dictionaries(mini, rows, ce_rows=128)
    failures = []
    for m in metrics:
        if m.l0 > FLOORS["l0"]:
            failures.append(f"{m.name}: L0 {m.l0:.1f} > 40")
        if m.ce_loss_recovered < FLOORS["ce_loss_recovered"]:
            failures.append(f"{m.name}: CE recovered {m.ce_loss_recovered:.3f} < 0.85")
        if m.explained_variance < FLOORS["explained_variance"]:
            failures.append(f"{m.name}: explained variance {m.explained_variance:.3f} < 0.70")
        if m.dead_fraction > FLOORS["dead_fraction"]:
            failures.append(f"{m.name}: dead fraction {m.dead_fraction:.3f} > 0.10")
    assert not failures, failures


def test_mini_model_predicts_code(mini):
    from saes.lm import heldout_loss
    from saes.mini_suite import heldout_rows

    rows = heldout_rows(mini, max_rows=16)
    loss = heldout_loss(mini.model, rows)
    uniform = torch.log(torch.tensor(float(mini.model.cfg.d_vocab)))
    assert loss < 0.5 * float(uniform), f"held-out loss {loss:.3f} is not far below uniform {float(uniform):.3f}"


def test_suite_eval_cli_prints_the_json_schema(capsys):
    import json

    from scripts.cli import main

    assert main(["suite-eval", "--model", "mini", "--json", "--rows", "8", "--ce-rows", "8", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report["model"]["heldout_loss"], float)
    keys = {"name", "kind", "layer", "hook_in", "hook_out", "d_sae", "l0", "explained_variance", "dead_fraction",
            "ce_loss_recovered"}
    assert len(report["dictionaries"]) == 8 and all(keys <= set(d) for d in report["dictionaries"])
    assert {d["kind"] for d in report["dictionaries"]} == {"attn_sae", "transcoder"}
