"""scripts/try_dictionary.py: a trial replaces exactly the settings it is given and refuses what it cannot build."""

import pytest

from saes import mini_recipe as recipe
from saes.testing import make_model
from scripts.try_dictionary import parse_args, trial_spec


@pytest.fixture(scope="module")
def model():
    return make_model(n_layers=4)


def test_a_trial_replaces_only_the_given_settings(model):
    args = parse_args(["--site", "mlp2", "--d-sae", "2048", "--k", "40", "--steps", "3200", "--seed", "7",
                       "--resample-every", "100", "--out", "x"])
    spec, cfg = trial_spec(model, args)
    base_spec, base_cfg = recipe.suite_specs(model)["mlp2"], recipe.train_config("mlp2")
    assert (spec.d_sae, spec.k, spec.activation) == (2048, 40, "topk")
    assert (spec.hook_in, spec.hook_out, spec.layer) == (base_spec.hook_in, base_spec.hook_out, 2)
    assert (cfg.steps, cfg.seed, cfg.resample_every) == (3200, 7, 100)
    assert (cfg.lr, cfg.aux_k, cfg.warmup_steps) == (base_cfg.lr, base_cfg.aux_k, base_cfg.warmup_steps)
    _, default_cfg = trial_spec(model, parse_args(["--site", "mlp2", "--out", "x"]))
    assert default_cfg.seed == base_cfg.seed and default_cfg.steps == base_cfg.steps


@pytest.mark.parametrize("argv,message", [
    (["--site", "mlp9"], "unknown site 'mlp9'"),
    (["--site", "mlp0", "--d-sae", "0"], "--d-sae must be positive"),
    (["--site", "mlp0", "--activation", "relu"], "needs --l1"),
    (["--site", "mlp0", "--l0", "0.01"], "--l0 trains a JumpReLU"),
    (["--site", "mlp0", "--activation", "jumprelu", "--l0", "0.01", "--k", "16"], "drop --k"),
    (["--site", "mlp0", "--activation", "jumprelu", "--bandwidth", "0.1"], "only apply to JumpReLU trained directly"),
])
def test_a_trial_that_cannot_be_built_is_refused_by_name(model, argv, message):
    with pytest.raises(ValueError, match=message):
        trial_spec(model, parse_args(argv + ["--out", "x"]))


def test_a_direct_jumprelu_trial_has_no_batch_topk_target(model):
    args = parse_args(["--site", "mlp2", "--activation", "jumprelu", "--l0", "0.003", "--bandwidth", "0.1",
                       "--init-threshold", "0.2", "--out", "x"])
    spec, cfg = trial_spec(model, args)
    assert spec.activation == "jumprelu" and spec.k is None
    assert (cfg.l0_coefficient, cfg.jumprelu_bandwidth, cfg.jumprelu_init_threshold, cfg.aux_k) == (0.003, 0.1, 0.2, None)
