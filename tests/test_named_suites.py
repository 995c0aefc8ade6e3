"""Named suites beyond mini and gpt2-small: the mini extras (a skip transcoder, a CLT), gpt2-small with a subset of
its dictionaries, and gpt2-small-clt through a hub cache holding a CLT in circuit-tracer's layout at tiny size;
plus the trainer paths that built the extras (skip transcoders and CLTs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saes.clt import CLTConfig, CrossLayerTranscoder
from saes.dictionary import DictionarySpec, build_dictionary, reconstruct, spec_of
from saes.suite import MINI_DIR, load_suite
from saes.train import DictionaryTrainer, TrainConfig
from saes.train_clt import build_clt, train_clt
from tests.test_formats import clt_tensors, ct_clt_forward, put_in_hub_cache, write_clt

ROOT = Path(__file__).resolve().parents[1]


# --- the mini extras ---------------------------------------------------------------------------------
def _mlp_io(suite, text="def f(x):\n    return x + 1\n"):
    toks = suite.tokens(text)
    names = [f"blocks.{l}.ln2.hook_normalized" for l in range(suite.n_layers)] + \
            [f"blocks.{l}.hook_mlp_out" for l in range(suite.n_layers)]
    _, cache = suite.model.run_with_cache(toks, names_filter=lambda n: n in names)
    return ([cache[f"blocks.{l}.ln2.hook_normalized"][0] for l in range(suite.n_layers)],
            [cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(suite.n_layers)])


def test_mini_skip_has_a_trained_skip_transcoder_at_layer_1(one_torch_thread):
    suite = load_suite("mini-skip")
    tc = suite.transcoders[1]
    spec = spec_of(tc)
    assert spec.skip and spec.hook_in == "blocks.1.ln2.hook_normalized" and sorted(suite.transcoders) == [0, 1, 2, 3]
    assert tc.W_skip.abs().sum() > 0, "W_skip was trained"
    xs, ys = _mlp_io(suite)
    with torch.no_grad():
        # the file's numbers hold on this text too: the skip path explains part of the output on its own
        full = 1 - (ys[1] - reconstruct(tc, xs[1])).pow(2).sum() / (ys[1] - ys[1].mean(0)).pow(2).sum()
        without = 1 - (ys[1] - reconstruct(tc, xs[1]) + xs[1] @ tc.W_skip.T).pow(2).sum() / (ys[1] - ys[1].mean(0)).pow(2).sum()
    assert full > 0.5 and full > without
    metrics = json.loads((MINI_DIR / "extras" / "skip_mlp1" / "metrics.json").read_text())
    assert metrics["explained_variance"] > metrics["explained_variance_without_skip"]


def test_mini_clt_reconstructs_every_mlp(one_torch_thread):
    suite = load_suite("mini-clt")
    assert suite.transcoders == {} and sorted(suite.attn_saes) == [0, 1, 2, 3]
    clt = suite.clt
    assert clt.n_layers == 4 and clt.cfg.activation == "jumprelu" and (clt.threshold >= 0).all()
    xs, ys = _mlp_io(suite)
    with torch.no_grad():
        outs = clt(xs)
    for t in range(4):
        ev = 1 - (ys[t] - outs[t]).pow(2).sum() / (ys[t] - ys[t].mean(0)).pow(2).sum()
        assert ev > 0.3, f"layer {t}: explained variance {ev:.2f}"
    files = {p.name: p.stat().st_size for p in (MINI_DIR / "extras").rglob("*") if p.is_file()}
    assert sum(files.values()) < 3_000_000, files  # the extras stay small


def test_mini_extras_are_narrowed_by_name():
    from saes.mini_suite import load_mini_clt, load_mini_skip

    assert load_mini_clt(MINI_DIR, dictionaries={"clt"}).attn_saes == {}
    assert load_mini_clt(MINI_DIR, dictionaries={"attn2"}).clt is None
    assert sorted(load_mini_skip(MINI_DIR, dictionaries={"mlp1", "attn"}).transcoders) == [1]
    with pytest.raises(ValueError, match="unknown dictionary 'mlp1'"):
        load_mini_clt(MINI_DIR, dictionaries={"mlp1"})
    with pytest.raises(ValueError, match="layers 0..3"):
        load_mini_skip(MINI_DIR, dictionaries={"attn7"})


def test_a_clt_that_does_not_fit_the_model_is_refused():
    from saes.suite import Suite

    suite = load_suite("mini")
    with pytest.raises(ValueError, match="spans 3 layers but 'mini' has 4"):
        Suite("x", suite.model, {}, {}, clt=CrossLayerTranscoder(CLTConfig(3, 128, 8)))
    with pytest.raises(ValueError, match="width is 64"):
        Suite("x", suite.model, {}, {}, clt=CrossLayerTranscoder(CLTConfig(4, 64, 8)))


# --- the trainers ------------------------------------------------------------------------------------
def test_skip_transcoder_training_learns_the_linear_part(one_torch_thread):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g) / 4

    def batches():
        while True:
            x = torch.randn(256, 16, generator=g)
            yield x, x @ A.T  # a purely linear map: the skip path can carry all of it

    spec = DictionarySpec.transcoder(0, 16, 32, activation="topk", k=4, skip=True)
    tc = build_dictionary(spec)
    trainer = DictionaryTrainer(tc, TrainConfig(steps=300, lr=1e-2, warmup_steps=10))
    it = batches()
    stats = [trainer.step(next(it)) for _ in range(300)]
    assert stats[-1].mse < 0.05 < stats[0].mse
    assert (tc.W_skip - A).norm() / A.norm() < 0.3


def _clt_batches(teacher, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(teacher.n_layers, 128, teacher.cfg.d_model, generator=g)
        with torch.no_grad():
            y = torch.stack(teacher(list(x)))
        yield x, y  # outside no_grad: a generator suspended inside it would switch gradients off for the caller


def test_clt_training_is_seeded_and_learns(one_torch_thread):
    teacher = build_clt(3, 8, 16, seed=5)
    with torch.no_grad():
        teacher.threshold.fill_(0.5)
    runs = []
    for _ in range(2):
        clt = build_clt(3, 8, 32, seed=0)
        hist = train_clt(clt, _clt_batches(teacher, 1), TrainConfig(steps=150, lr=5e-3, warmup_steps=10), k=6,
                         progress=False, log_every=10)
        runs.append((clt, hist))
    (a, ha), (b, _) = runs
    assert ha.history[-1]["mse"] < 0.5 * ha.history[0]["mse"]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # same seed, same batches: the same CLT
    assert (a.threshold >= 0).all() and a.threshold.abs().sum() > 0


# --- gpt2-small: subsets, and the CLT through a hub cache --------------------------------------------
def test_gpt2_small_dictionary_names():
    from saes.pretrained import select_dictionaries

    assert select_dictionaries({"attn0", "mlp"}, 12) == {"attn": [0], "mlp": list(range(12)), "clt": False}
    assert select_dictionaries("mlp3", 12)["mlp"] == [3]
    with pytest.raises(ValueError, match="unknown dictionary 'clt'"):
        select_dictionaries({"clt"}, 12)
    with pytest.raises(ValueError, match="layers 0..11"):
        select_dictionaries({"mlp12"}, 12)
    with pytest.raises(ValueError, match="no dictionaries selected"):
        select_dictionaries(set(), 12)


CLT_SCRIPT = r"""
import sys, torch
from saes.pretrained import load_gpt2_small_clt, GPT2_CLT_REPO
xs = torch.load(sys.argv[1], weights_only=True)
clt = load_gpt2_small_clt()
torch.save({"out": clt(list(xs)), "acts": [clt.encode(l, xs[l]) for l in range(12)]}, sys.argv[2])
print("HOOKS", clt.hook_in(3), clt.hook_out(3), clt.cfg.model_name)
try:
    load_gpt2_small_clt(repo="fake-org/a-repo-never-cached")
except ValueError as e:
    print("REFUSED:", e)
"""


def test_gpt2_small_clt_through_a_hub_cache(tmp_path):
    from saes.pretrained import GPT2_CLT_REPO

    enc, dec = clt_tensors(n_layers=12, d_model=16, d_sae=6, seed=3)
    put_in_hub_cache(tmp_path / "hub", GPT2_CLT_REPO, write_clt(tmp_path / "clt", enc, dec, model_name="gpt2"))
    xs = torch.randn(12, 5, 16)
    torch.save(xs, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CLT_SCRIPT, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    want_acts, want_outs = ct_clt_forward(enc, dec, list(xs), "relu")
    for l in range(12):
        torch.testing.assert_close(y["acts"][l], want_acts[l], rtol=1e-5, atol=1e-5)
        # the file's MLP outputs with their mean over d_model removed (center_writing_weights)
        centred = want_outs[l] - want_outs[l].mean(-1, keepdim=True)
        torch.testing.assert_close(y["out"][l], centred, rtol=1e-5, atol=1e-4)
    assert "HOOKS blocks.3.ln2.hook_normalized blocks.3.hook_mlp_out gpt2-small" in proc.stdout
    assert "REFUSED: could not get fake-org/a-repo-never-cached from the Hugging Face hub" in proc.stdout
