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


# --- sae-lens's registry ------------------------------------------------------------------------------
REGISTRY_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from saes.registry import load_sae_lens_dictionary
from saes.dictionary import encode, reconstruct, spec_of
from saes.suite import check_fits, flatten_z
torch.manual_seed(0)
model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=40,
                                                  n_ctx=12, act_fn="gelu", normalization_type="LNPre"))
_, cache = model.run_with_cache(torch.randint(0, 40, (1, 9)))
cache_dir = sys.argv[1]
out = {}
sae = load_sae_lens_dictionary("fake-org/attn-saes", "blocks.1.hook_attn_out", model)
check_fits(model, sae)
f = load_file(sys.argv[2])
a, z = cache["blocks.1.hook_attn_out"][0], flatten_z(cache["blocks.1.attn.hook_z"][0])
acts = torch.relu((a - f["b_dec"]) @ f["W_enc"] + f["b_enc"])   # sae-lens's formula on attn_out (apply_b_dec_to_input)
recon = acts @ f["W_dec"] + f["b_dec"]
W_O = model.blocks[1].attn.W_O.reshape(16, 16)
out["spec"] = [spec_of(sae).hook_in, spec_of(sae).hook_out, spec_of(sae).d_in]
out["acts"] = float((encode(sae, z) - acts).abs().max() / acts.abs().max())
out["recon"] = float((reconstruct(sae, z) @ W_O + model.blocks[1].attn.b_O - recon).abs().max() / recon.abs().max())
out["error"] = float(((z - reconstruct(sae, z)) @ W_O - (a - recon)).abs().max() / (a - recon).abs().max())
tc = load_sae_lens_dictionary("fake-org/attn-saes", "blocks.0.transcoder")
out["tc"] = [spec_of(tc).kind, spec_of(tc).hook_in, spec_of(tc).hook_out]
for sae_id in ("blocks.0.hook_resid_pre", "missing"):
    try:
        load_sae_lens_dictionary("fake-org/attn-saes", sae_id, model)
    except ValueError as e:
        out[sae_id] = str(e)
try:
    load_sae_lens_dictionary("fake-org/attn-saes", "blocks.0.hook_attn_out")
except ValueError as e:
    out["no model"] = str(e)
kk = load_sae_lens_dictionary("gpt2-small-hook-z-kk", "blocks.3.hook_z")  # a release of the registry itself
x, kk_sd = torch.load(sys.argv[3], weights_only=True)
want = torch.relu((x - kk_sd["b_dec"]) @ kk_sd["W_enc"] + kk_sd["b_enc"]) @ kk_sd["W_dec"] + kk_sd["b_dec"]
out["kk"] = [spec_of(kk).hook_in, spec_of(kk).kind, float((reconstruct(kk, x) - want).abs().max())]
print(json.dumps(out))
"""


def _sae_lens_folder(folder: Path, spec: DictionarySpec, seed: int, apply_b_dec_to_input: bool = False):
    from saes.io import save_dictionary

    sae = build_dictionary(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_dictionary(sae, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = apply_b_dec_to_input
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_attn_out_sae_folds_onto_hook_z_in_process(one_torch_thread):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saes.registry import attn_out_to_hook_z, placement
    from saes.suite import flatten_z

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=12, n_heads=4, d_head=4, d_mlp=16, d_vocab=30,
                                                      n_ctx=8, act_fn="gelu", normalization_type="LNPre"))
    spec = DictionarySpec("sae", 0, 12, 20, 12, "blocks.0.hook_attn_out", "blocks.0.hook_attn_out", activation="topk", k=5)
    sae = build_dictionary(spec, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(), sae.b_dec.normal_()
    _, cache = model.run_with_cache(torch.randint(0, 30, (1, 7)))
    a, z = cache["blocks.0.hook_attn_out"][0], flatten_z(cache["blocks.0.attn.hook_z"][0])
    zsae = attn_out_to_hook_z(sae, model, 0)  # n_heads * d_head = 16 > d_model = 12: W_O has full column rank
    W_O, b_O = model.blocks[0].attn.W_O.reshape(16, 12), model.blocks[0].attn.b_O
    from saes.dictionary import encode

    torch.testing.assert_close(encode(zsae, z), encode(sae, a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reconstruct(zsae, z) @ W_O + b_O, reconstruct(sae, a), rtol=1e-4, atol=1e-4)
    assert spec_of(zsae).hook_in == "blocks.0.attn.hook_z"
    with torch.no_grad():
        model.blocks[0].attn.W_O[:, :, 6:] = 0  # rank 6 < d_model: the decoder cannot be carried back
    with pytest.raises(ValueError, match="cannot carry the decoder back to hook_z"):
        attn_out_to_hook_z(sae, model, 0)
    assert placement({"metadata": {"hook_name": "blocks.2.hook_z"}}) == ("attn_z", 2)
    with pytest.raises(ValueError, match="reads 'blocks.2.hook_mlp_out'"):
        placement({"metadata": {"hook_name": "blocks.2.hook_mlp_out"}})
    with pytest.raises(ValueError, match="normalize_activations"):
        placement({"metadata": {"hook_name": "blocks.2.hook_z"}, "normalize_activations": "expected_average_only_in"})
    with pytest.raises(ValueError, match="architecture 'gated'"):
        placement({"metadata": {"hook_name": "blocks.2.hook_z"}, "architecture": "gated"})


@pytest.mark.slow  # a fresh interpreter importing sae-lens and TransformerLens
def test_sae_lens_dictionaries_are_placed_or_refused(tmp_path):
    repo = tmp_path / "repo"
    attn_out = DictionarySpec("sae", 1, 16, 24, 16, "blocks.1.hook_attn_out", "blocks.1.hook_attn_out")
    _sae_lens_folder(repo / "blocks.1.hook_attn_out", attn_out, seed=1, apply_b_dec_to_input=True)
    _sae_lens_folder(repo / "blocks.0.hook_attn_out", DictionarySpec("sae", 0, 16, 24, 16, "blocks.0.hook_attn_out",
                                                                     "blocks.0.hook_attn_out"), seed=4)
    _sae_lens_folder(repo / "blocks.0.transcoder", DictionarySpec.transcoder(0, 16, 20), seed=2)
    resid = DictionarySpec("sae", 0, 16, 24, 16, "blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre")
    _sae_lens_folder(repo / "blocks.0.hook_resid_pre", resid, seed=3)
    (repo / "blocks.0.hook_resid_pre" / "sae_weights.safetensors").unlink()  # refused before any weights are read
    hub = tmp_path / "hub"
    commit = "2" * 40
    base = hub / "models--fake-org--attn-saes"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for f in repo.rglob("*"):
        if f.is_file():
            dst = base / "snapshots" / commit / f.relative_to(repo)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    from tests.test_pretrained import _put_in_hub_cache, write_kk_files

    kk_name, kk_sd = write_kk_files(tmp_path / "kk", layer=3, d_sae=32)
    kk_cfg = kk_name.split(".pt")[0] + "_cfg.json"
    _put_in_hub_cache(hub, "ckkissane/attn-saes-gpt2-small-all-layers",
                      {kk_name: tmp_path / "kk" / kk_name, kk_cfg: tmp_path / "kk" / kk_cfg})
    torch.save((torch.randn(5, 768), kk_sd), tmp_path / "kk.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", REGISTRY_SCRIPT, str(hub),
                           str(repo / "blocks.1.hook_attn_out" / "sae_weights.safetensors"), str(tmp_path / "kk.pt")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["spec"] == ["blocks.1.attn.hook_z", "blocks.1.attn.hook_z", 16]
    assert out["acts"] < 1e-4 and out["recon"] < 1e-4 and out["error"] < 1e-3, out
    assert out["tc"] == ["transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    assert "reads 'blocks.0.hook_resid_pre'; only what fits here" in out["blocks.0.hook_resid_pre"]
    assert "could not get sae-lens 'fake-org/attn-saes' / 'missing'" in out["missing"]
    assert "pass the model" in out["no model"]
    assert out["kk"][:2] == ["blocks.3.attn.hook_z", "attn_sae"] and out["kk"][2] < 1e-4


def test_a_circuit_tracer_set_joins_the_mini_model(tmp_path):
    from saes.formats import suite_with_set
    from tests.test_formats import plt_tensors, write_set

    mini = load_suite("mini")
    folder = write_set(tmp_path / "set", [plt_tensors(d_model=128, d_sae=8, skip=True, seed=s) for s in range(4)])
    s = suite_with_set(mini, folder)
    assert sorted(s.transcoders) == [0, 1, 2, 3] and sorted(s.attn_saes) == [0, 1, 2, 3] and s.clt is None
    assert all(spec_of(t).skip for t in s.transcoders.values())
    enc, dec = clt_tensors(n_layers=4, d_model=128, d_sae=5)
    c = suite_with_set(mini, write_clt(tmp_path / "clt", enc, dec), keep_attention=False)
    assert c.clt.n_layers == 4 and c.transcoders == {} and c.attn_saes == {}
    with pytest.raises(ValueError, match="spans 3 layers but 'mini' has 4"):
        enc, dec = clt_tensors(n_layers=3, d_model=128, d_sae=5)
        suite_with_set(mini, write_clt(tmp_path / "clt3", enc, dec))
    with pytest.raises(ValueError, match="width is 16 but 'mini' has width 128"):
        suite_with_set(mini, write_set(tmp_path / "narrow", [plt_tensors(d_model=16) for _ in range(4)]))
