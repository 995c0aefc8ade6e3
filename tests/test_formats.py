"""circuit-tracer's transcoder sets and CLTs: files written in exactly its layout, read into our objects, and the
outputs compared with the formula computed directly from the file's tensors (in circuit-tracer's own
conventions: ``W_enc [d_sae, d_model]``, ``pre = x @ W_enc.T + b_enc``, TopK keeping negative values)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saes.clt import CLTConfig, CrossLayerTranscoder, load_clt_dir
from saes.dictionary import encode, reconstruct, spec_of
from saes.formats import load_clt, load_transcoder_set, save_clt, save_transcoder_set

ROOT = Path(__file__).resolve().parents[1]


# --- factories: files in circuit-tracer's layout -----------------------------------------------------
def plt_tensors(d_model=8, d_sae=12, skip=False, threshold=False, seed=0, enc_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_sae, d_model, generator=g), "W_dec": torch.randn(d_sae, d_model, generator=g),
         "b_enc": torch.randn(d_sae, generator=g) + enc_shift, "b_dec": torch.randn(d_model, generator=g)}
    if skip:
        t["W_skip"] = torch.randn(d_model, d_model, generator=g) * 0.3
    if threshold:
        t["activation_function.threshold"] = torch.rand(d_sae, generator=g)
    return t


def write_set(folder: Path, layers: list[dict], **config):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(layers):
        save_file(t, str(folder / f"layer_{i}.safetensors"))
    cfg = {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
           "feature_output_hook": "hook_mlp_out", **config}
    (folder / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return folder


def clt_tensors(n_layers=3, d_model=8, d_sae=10, threshold=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc, dec = [], []
    for l in range(n_layers):
        e = {f"W_enc_{l}": torch.randn(d_sae, d_model, generator=g), f"b_enc_{l}": torch.randn(d_sae, generator=g),
             f"b_dec_{l}": torch.randn(d_model, generator=g)}
        if threshold:
            e[f"threshold_{l}"] = torch.rand(d_sae, generator=g)
        enc.append(e)
        dec.append({f"W_dec_{l}": torch.randn(d_sae, n_layers - l, d_model, generator=g)})
    return enc, dec


def write_clt(folder: Path, enc, dec, **config):
    folder.mkdir(parents=True, exist_ok=True)
    for l, (e, d) in enumerate(zip(enc, dec)):
        save_file(e, str(folder / f"W_enc_{l}.safetensors"))
        save_file(d, str(folder / f"W_dec_{l}.safetensors"))
    cfg = {"model_kind": "cross_layer_transcoder", "feature_input_hook": "ln2.hook_normalized",
           "feature_output_hook": "hook_mlp_out", **config}
    (folder / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return folder


# --- reference formulas, straight from the file tensors ----------------------------------------------
def ct_activation(pre, activation, threshold=None, k=None):
    if activation == "relu":
        return pre.relu()
    if activation == "jumprelu":
        return pre * (pre > threshold)
    _, idx = pre.topk(k, dim=-1)  # circuit-tracer's TopK: a 0/1 gate on the k largest, values kept as they are
    return pre * torch.zeros_like(pre).scatter(-1, idx, 1.0)


def ct_plt_forward(t, x, activation, k=None):
    acts = ct_activation(x @ t["W_enc"].T + t["b_enc"], activation, t.get("activation_function.threshold"), k)
    out = acts @ t["W_dec"] + t["b_dec"]
    return acts, out + x @ t["W_skip"].T if "W_skip" in t else out


def ct_clt_forward(enc, dec, xs, activation):
    n = len(enc)
    acts = [ct_activation(xs[l] @ enc[l][f"W_enc_{l}"].T + enc[l][f"b_enc_{l}"], activation, enc[l].get(f"threshold_{l}"))
            for l in range(n)]
    outs = []
    for t in range(n):
        out = enc[t][f"b_dec_{t}"].clone()
        for src in range(t + 1):
            out = out + acts[src] @ dec[src][f"W_dec_{src}"][:, t - src, :]
        outs.append(out)
    return acts, outs


# --- per-layer transcoders ---------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_set_matches_the_file_formula(tmp_path, activation, skip):
    layers = [plt_tensors(skip=skip, threshold=activation == "jumprelu", seed=s) for s in range(3)]
    config = {"activation": "topk", "k": 3} if activation == "topk" else {}
    tcs = load_transcoder_set(write_set(tmp_path / "set", layers, **config))
    assert sorted(tcs) == [0, 1, 2]
    x = torch.randn(7, 8)
    for l, tc in tcs.items():
        spec = spec_of(tc)
        assert (spec.hook_in, spec.hook_out) == (f"blocks.{l}.ln2.hook_normalized", f"blocks.{l}.hook_mlp_out")
        assert spec.activation == activation and spec.skip == skip
        want_acts, want_out = ct_plt_forward(layers[l], x, activation, k=3)
        torch.testing.assert_close(encode(tc, x), want_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reconstruct(tc, x), want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tc(x), want_out, rtol=1e-5, atol=1e-5)  # sae-lens's own forward agrees


def test_topk_keeps_negative_preactivations_as_circuit_tracer_does(tmp_path):
    t = plt_tensors(enc_shift=-50.0)  # every pre-activation is negative
    tc = load_transcoder_set(write_set(tmp_path / "set", [t], activation="topk", k=4))[0]
    x = torch.randn(5, 8)
    acts = encode(tc, x)
    assert ((acts < 0).sum(-1) == 4).all(), "the 4 kept activations of each row are negative and must stay so"
    want_acts, want_out = ct_plt_forward(t, x, "topk", k=4)
    torch.testing.assert_close(acts, want_acts)
    torch.testing.assert_close(tc(x), want_out, rtol=1e-5, atol=1e-4)
    assert spec_of(tc).topk_relu is False


def test_selected_layers_and_explicit_file_list(tmp_path):
    layers = [plt_tensors(seed=s) for s in range(3)]
    folder = write_set(tmp_path / "set", layers)
    assert sorted(load_transcoder_set(folder, layers=[2])) == [2]
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                                        "feature_output_hook: hook_mlp_out\ntranscoders:\n"
                                        f"  - layer_1.safetensors\n  - {folder / 'layer_0.safetensors'}\n")
    tcs = load_transcoder_set(folder)
    x = torch.randn(3, 8)
    torch.testing.assert_close(reconstruct(tcs[0], x), ct_plt_forward(layers[1], x, "relu")[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers 0..1; asked for \[5\]"):
        load_transcoder_set(folder, layers=[5])


def test_set_writer_round_trips(tmp_path):
    layers = [plt_tensors(skip=True, threshold=True, seed=s) for s in range(2)]
    tcs = load_transcoder_set(write_set(tmp_path / "a", layers))
    again = load_transcoder_set(save_transcoder_set(tcs, tmp_path / "b"))
    x = torch.randn(4, 8)
    for l in tcs:
        torch.testing.assert_close(reconstruct(again[l], x), reconstruct(tcs[l], x))


# --- cross-layer transcoders -------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [False, True])
def test_clt_matches_the_file_formula(tmp_path, threshold):
    enc, dec = clt_tensors(threshold=threshold)
    clt = load_clt(write_clt(tmp_path / "clt", enc, dec))
    assert clt.cfg.activation == ("jumprelu" if threshold else "relu")
    assert [tuple(w.shape) for w in clt.W_dec] == [(10, 3, 8), (10, 2, 8), (10, 1, 8)]
    xs = [torch.randn(6, 8) for _ in range(3)]
    want_acts, want_outs = ct_clt_forward(enc, dec, xs, "jumprelu" if threshold else "relu")
    for l in range(3):
        torch.testing.assert_close(clt.encode(l, xs[l]), want_acts[l], rtol=1e-5, atol=1e-5)
    for got, want in zip(clt(xs), want_outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert (clt.hook_in(2), clt.hook_out(2)) == ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")


def test_clt_decode_is_the_sum_over_source_layers():
    clt = CrossLayerTranscoder(CLTConfig(4, 6, 5, activation="topk", k=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    xs = [torch.randn(3, 6, generator=g) for _ in range(4)]
    acts = [clt.encode(l, x) for l, x in enumerate(xs)]
    assert all(((a != 0).sum(-1) <= 2).all() for a in acts)
    outs = clt.decode(acts)
    for t in range(4):
        # one source at a time: decoding only layer src's activations adds its writes and nothing else
        parts = [clt.decode([a if i == src else torch.zeros_like(a) for i, a in enumerate(acts)])[t] - clt.b_dec[t]
                 for src in range(4)]
        for src in range(t + 1, 4):
            torch.testing.assert_close(parts[src], torch.zeros_like(parts[src]))  # no feature writes backwards
        torch.testing.assert_close(outs[t], clt.b_dec[t] + sum(parts), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts[0], acts[0] @ clt.decoder_vectors(0, slice(None))[:, t], rtol=1e-5, atol=1e-5)


def test_clt_writers_round_trip(tmp_path):
    enc, dec = clt_tensors(threshold=True)
    clt = load_clt(write_clt(tmp_path / "a", enc, dec))
    xs = [torch.randn(2, 8) for _ in range(3)]
    for a, b in zip(load_clt(save_clt(clt, tmp_path / "b"))(xs), clt(xs)):
        torch.testing.assert_close(a, b)
    for a, b in zip(load_clt_dir(clt.save(tmp_path / "ours"))(xs), clt(xs)):
        torch.testing.assert_close(a, b)


# --- refused inputs ----------------------------------------------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickles_are_never_opened(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    exploit = _Exploit()
    exploit.target = tmp_path / "pwned"
    torch.save({"W_enc": exploit}, folder / "layer_0.pt")
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                                        "feature_output_hook: hook_mlp_out\ntranscoders: [layer_0.pt]\n")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_transcoder_set(folder)
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                                        "feature_output_hook: hook_mlp_out\n")
    with pytest.raises(ValueError, match="pickles are not opened"):
        load_transcoder_set(folder)
    (folder / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_transcoder_set(folder)
    assert not (tmp_path / "pwned").exists()


def test_bad_shapes_and_tensors_are_named(tmp_path):
    t = plt_tensors()
    t["W_dec"] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match=r"layer_0.safetensors: tensor W_dec has shape \(5, 8\), expected \(12, 'd_out'\)"):
        load_transcoder_set(write_set(tmp_path / "a", [t]))
    t = {**plt_tensors(), "W_skip": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="W_skip has shape"):
        load_transcoder_set(write_set(tmp_path / "b", [t]))
    with pytest.raises(ValueError, match=r"unknown tensors \['log_thresholds'\]"):
        load_transcoder_set(write_set(tmp_path / "c", [{**plt_tensors(), "log_thresholds": torch.zeros(12)}]))
    with pytest.raises(ValueError, match="thresholds are negative"):
        load_transcoder_set(write_set(tmp_path / "d", [{**plt_tensors(), "activation_function.threshold": -torch.ones(12)}]))
    folder = write_set(tmp_path / "e", [plt_tensors(), plt_tensors(), plt_tensors()])
    (folder / "layer_1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"layers \[1\] are missing"):
        load_transcoder_set(folder)
    (folder / "layer_0.safetensors").write_bytes(b"\x00garbage" * 20)
    (folder / "layer_1.safetensors").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ValueError, match="corrupt"):
        load_transcoder_set(folder)
    enc, dec = clt_tensors()
    dec[1] = {"W_dec_1": torch.zeros(10, 3, 8)}  # source layer 1 of 3 writes 2 layers, not 3
    with pytest.raises(ValueError, match=r"W_dec_1 has shape \(10, 3, 8\), expected \(10, 2, 8\)"):
        load_clt(write_clt(tmp_path / "clt", enc, dec))


def test_configs_it_cannot_place_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hook_resid_mid.*not supported"):
        load_transcoder_set(write_set(tmp_path / "a", [plt_tensors()], feature_input_hook="hook_resid_mid"))
    with pytest.raises(ValueError, match="needs a positive integer k"):
        load_transcoder_set(write_set(tmp_path / "b", [plt_tensors()], activation="topk"))
    with pytest.raises(ValueError, match="model_kind is 'transcoder_set'; load a transcoder set with load_transcoder_set"):
        load_clt(write_set(tmp_path / "c", [plt_tensors()]))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_transcoder_set(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="neither a local folder nor a hub reference"):
        load_transcoder_set("just-a-name")


# --- the hub, offline --------------------------------------------------------------------------------
def put_in_hub_cache(cache: Path, repo: str, folder: Path, prefix: str = "") -> None:
    """Lay a folder out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<prefix><file>."""
    commit = "1" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        dst = base / "snapshots" / commit / prefix / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())


HUB_SCRIPT = r"""
import sys, torch
from saes.formats import load_transcoder_set, load_clt
from saes.dictionary import reconstruct
x = torch.load(sys.argv[1], weights_only=True)
tcs = load_transcoder_set("fake-org/fake-transcoders/skip-set")
clt = load_clt("fake-org/fake-clt")
torch.save({"plt": [reconstruct(tcs[l], x) for l in sorted(tcs)], "clt": clt([x] * clt.n_layers)}, sys.argv[2])
try:
    load_clt("fake-org/not-cached")
except ValueError as e:
    print("REFUSED:", e)
"""


@pytest.mark.slow  # a fresh interpreter importing sae-lens; the CLT hub path runs in the default tier (test_named_suites)
def test_hub_references_load_offline_from_the_cache(tmp_path):
    layers = [plt_tensors(skip=True, seed=s) for s in range(2)]
    put_in_hub_cache(tmp_path / "hub", "fake-org/fake-transcoders", write_set(tmp_path / "plt", layers), "skip-set")
    enc, dec = clt_tensors(threshold=True)
    put_in_hub_cache(tmp_path / "hub", "fake-org/fake-clt", write_clt(tmp_path / "clt", enc, dec))
    x = torch.randn(4, 8)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    for l in range(2):
        torch.testing.assert_close(y["plt"][l], ct_plt_forward(layers[l], x, "relu")[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(y["clt"], ct_clt_forward(enc, dec, [x] * 3, "jumprelu")[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert "REFUSED: could not get fake-org/not-cached from the Hugging Face hub" in proc.stdout
    assert "HF_HUB_CACHE" in proc.stdout


# --- circuit-tracer itself reads what we write --------------------------------------------------------
def test_circuit_tracer_reads_our_files_and_agrees(tmp_path):
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set as ct_load_set

    layers = [plt_tensors(skip=True, threshold=True, seed=s) for s in range(2)]
    ours = load_transcoder_set(write_set(tmp_path / "a", layers))
    folder = save_transcoder_set(ours, tmp_path / "b")
    theirs = ct_load_set({l: str(folder / f"layer_{l}.safetensors") for l in range(2)}, scan="test",
                         feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
                         device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    x = torch.randn(5, 8)
    for l in range(2):
        torch.testing.assert_close(reconstruct(ours[l], x), theirs[l](x), rtol=1e-5, atol=1e-5)
    enc, dec = clt_tensors(threshold=True)
    clt = load_clt(write_clt(tmp_path / "c", enc, dec))
    their_clt = ct_load_clt(str(save_clt(clt, tmp_path / "d")), device=torch.device("cpu"), dtype=torch.float32,
                            lazy_decoder=False)
    xs = torch.randn(3, 5, 8)
    theirs_out = their_clt(xs)
    for t, got in enumerate(clt(list(xs))):
        torch.testing.assert_close(got, theirs_out[t], rtol=1e-5, atol=1e-4)


def test_writer_keeps_per_layer_activations_and_refuses_what_circuit_tracer_cannot_express(tmp_path):
    from saes.dictionary import DictionarySpec, build_dictionary

    mixed = {0: load_transcoder_set(write_set(tmp_path / "j", [plt_tensors(threshold=True)]))[0],
             1: load_transcoder_set(write_set(tmp_path / "r", [plt_tensors(seed=1)]))[0]}
    again = load_transcoder_set(save_transcoder_set(mixed, tmp_path / "mixed"))
    assert [spec_of(again[l]).activation for l in (0, 1)] == ["jumprelu", "relu"]
    relu_topk = {0: build_dictionary(DictionarySpec.transcoder(0, 8, 12, activation="topk", k=3))}
    with pytest.raises(ValueError, match="topk_relu=True"):
        save_transcoder_set(relu_topk, tmp_path / "t")
    with pytest.raises(ValueError, match="one k for the whole set"):
        save_transcoder_set({**mixed, 2: build_dictionary(DictionarySpec.transcoder(2, 8, 12, activation="topk", k=3,
                                                                                   topk_relu=False))}, tmp_path / "u")
