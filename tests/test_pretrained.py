"""The GPT-2 small loaders, run unchanged on files written in exactly the published formats.

The hub is not reachable here, so the test writes the files into a Hugging Face cache of its own (the hub's
cache layout) and runs the real loaders in a subprocess with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set.
"""

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from saes.pretrained import (KK_RELEASE, TRANSCODER_FILE, TRANSCODER_REPO, read_transcoder_file,
                             transcoder_from_state_dict)

ROOT = Path(__file__).resolve().parents[1]


def _fake_config_module():
    """Stand-in for Dunefsky et al.'s ``sae_training.config`` so that torch.save pickles the real class path."""
    mod = types.ModuleType("sae_training.config")

    @dataclasses.dataclass
    class LanguageModelSAERunnerConfig:
        model_name: str = "gpt2-small"
        hook_point: str = "blocks.0.ln2.hook_normalized"
        out_hook_point: str = "blocks.0.hook_mlp_out"
        hook_point_layer: int = 0
        d_in: int = 768
        d_out: int = 768
        d_sae: int = 24576
        is_transcoder: bool = True
        dtype: torch.dtype = torch.float32
        l1_coefficient: float = 1.4e-4

    LanguageModelSAERunnerConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    mod.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    return mod


def write_transcoder_file(path: Path, d_in=768, d_sae=64, layer=0, seed=0):
    """A file in the format of pchlenski/gpt2-transcoders: torch.save({"cfg": config object, "state_dict": ...})."""
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
        "b_dec_out": torch.randn(d_in, generator=gen) * 0.1,
    }
    pkg = types.ModuleType("sae_training")
    mod = _fake_config_module()
    sys.modules["sae_training"], sys.modules["sae_training.config"] = pkg, mod
    try:
        cfg = mod.LanguageModelSAERunnerConfig(hook_point=f"blocks.{layer}.ln2.hook_normalized", d_sae=d_sae, d_in=d_in)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"cfg": cfg, "state_dict": sd}, path)
    finally:
        del sys.modules["sae_training"], sys.modules["sae_training.config"]
    return sd


def dunefsky_forward(sd, x):
    """The transcoder as its authors compute it: b_dec subtracted from the input, b_dec_out added at the end."""
    acts = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    return acts @ sd["W_dec"] + sd["b_dec_out"]


def test_transcoder_file_converts_exactly(tmp_path):
    sd = write_transcoder_file(tmp_path / "t.pt")
    cfg, state = read_transcoder_file(tmp_path / "t.pt")
    assert cfg["hook_point"] == "blocks.0.ln2.hook_normalized" and cfg["d_sae"] == 64
    tc = transcoder_from_state_dict(state, layer=0)
    x = torch.randn(9, 768)
    from saes.dictionary import reconstruct, spec_of

    torch.testing.assert_close(reconstruct(tc, x), dunefsky_forward(sd, x), rtol=1e-4, atol=1e-4)
    spec = spec_of(tc)
    assert (spec.hook_in, spec.hook_out) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.target = target
    torch.save({"cfg": exploit, "state_dict": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused"):
        read_transcoder_file(tmp_path / "evil.pt")
    assert not target.exists()


def test_corrupt_transcoder_file_is_named(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        read_transcoder_file(tmp_path / "bad.pt")
    sd = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(5),
          "b_dec_out": torch.zeros(4)}
    with pytest.raises(ValueError, match="inconsistent"):
        transcoder_from_state_dict(sd, layer=0)
    with pytest.raises(ValueError, match="lacks"):
        transcoder_from_state_dict({"W_enc": torch.zeros(4, 8)}, layer=0)


def _put_in_hub_cache(cache: Path, repo: str, files: dict[str, Path]):
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    for name, src in files.items():
        dst = base / "snapshots" / commit / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def _kk_file_name(layer: int) -> str:
    import yaml

    import sae_lens

    directory = yaml.safe_load((Path(sae_lens.__file__).parent / "pretrained_saes.yaml").read_text())
    return next(s["path"] for s in directory[KK_RELEASE]["saes"] if s["id"] == f"blocks.{layer}.hook_z")


def write_kk_files(staging: Path, layer: int, d_sae: int, seed: int = 0):
    """Kissane et al.'s format: a state dict (.pt) and ``<name>_cfg.json`` with act_size, dict_size, act_name."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"W_enc": torch.randn(768, d_sae, generator=gen) / 28, "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
          "W_dec": torch.randn(d_sae, 768, generator=gen) / d_sae**0.5, "b_dec": torch.randn(768, generator=gen) * 0.1}
    name = _kk_file_name(layer)
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(sd, staging / name)
    cfg = {"act_size": 768, "dict_size": d_sae, "act_name": f"blocks.{layer}.attn.hook_z", "layer": layer,
           "l1_coeff": 1.0, "seed": 0, "enc_dtype": "fp32", "site": "z", "model_name": "gpt2-small"}
    (staging / (name.split(".pt")[0] + "_cfg.json")).write_text(json.dumps(cfg))
    return name, sd


LOADER_SCRIPT = r"""
import json, sys, torch
from saes.pretrained import load_kk_attn_sae, load_dunefsky_transcoder
from saes.dictionary import reconstruct, spec_of
layer = int(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True)
attn = load_kk_attn_sae(layer)
tc = load_dunefsky_transcoder(layer)
out = {"attn": reconstruct(attn, x), "tc": reconstruct(tc, x)}
torch.save(out, sys.argv[3])
print(json.dumps({"attn": spec_of(attn).__dict__, "tc": spec_of(tc).__dict__}))
"""


def _run_real_loaders(tmp_path, layer, d_sae):
    cache = tmp_path / "hub"
    staging = tmp_path / "staging"
    kk_name, kk_sd = write_kk_files(staging, layer, d_sae)
    _put_in_hub_cache(cache, "ckkissane/attn-saes-gpt2-small-all-layers",
                      {kk_name: staging / kk_name, kk_name.split(".pt")[0] + "_cfg.json": staging / (kk_name.split(".pt")[0] + "_cfg.json")})
    tc_name = TRANSCODER_FILE.format(layer=layer)
    tc_sd = write_transcoder_file(staging / tc_name, d_sae=d_sae, layer=layer)
    _put_in_hub_cache(cache, TRANSCODER_REPO, {tc_name: staging / tc_name})
    x = torch.randn(6, 768)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(layer), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    specs = json.loads(proc.stdout.strip().splitlines()[-1])
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    kk_expected = torch.relu((x - kk_sd["b_dec"]) @ kk_sd["W_enc"] + kk_sd["b_enc"]) @ kk_sd["W_dec"] + kk_sd["b_dec"]
    torch.testing.assert_close(y["attn"], kk_expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y["tc"], dunefsky_forward(tc_sd, x), rtol=1e-4, atol=1e-4)
    assert specs["attn"]["hook_in"] == specs["attn"]["hook_out"] == f"blocks.{layer}.attn.hook_z"
    assert specs["tc"]["hook_out"] == f"blocks.{layer}.hook_mlp_out" and specs["tc"]["d_sae"] == d_sae


def test_users_path_through_a_hub_cache(tmp_path):
    _run_real_loaders(tmp_path, layer=3, d_sae=96)


@pytest.mark.slow
def test_users_path_at_real_gpt2_small_shapes(tmp_path):
    _run_real_loaders(tmp_path, layer=0, d_sae=24576)


def test_layer_out_of_range():
    from saes.pretrained import load_dunefsky_transcoder

    with pytest.raises(ValueError, match="0..11"):
        load_dunefsky_transcoder(12)


# ---------------------------------------------------------------------------------------------- no hub, no files
def test_download_lines_fetch_exactly_what_the_offline_check_needs(tmp_path):
    from saes.pretrained import HubFilesMissing, check_hub_cache, download_commands, hub_files

    lines = download_commands()
    fetched = []
    for line in lines:
        words = line.split()
        assert words[:2] == ["huggingface-cli", "download"] and len(words) > 3, line
        fetched += [(words[2], name) for name in words[3:]]
    assert sorted(fetched) == sorted(hub_files()) and len(set(fetched)) == len(fetched) == 6 + 24 + 12
    assert {name for repo, name in fetched if repo == "ckkissane/attn-saes-gpt2-small-all-layers"} >= {_kk_file_name(5)}
    assert ("pchlenski/gpt2-transcoders", TRANSCODER_FILE.format(layer=11)) in fetched
    # a cache holding exactly those files passes the check; without one of them the check names it
    cache = tmp_path / "hub"
    staging = tmp_path / "staging"
    by_repo: dict[str, dict[str, Path]] = {}
    for repo, name in fetched:
        (staging / repo).mkdir(parents=True, exist_ok=True)
        if repo == TRANSCODER_REPO and name == TRANSCODER_FILE.format(layer=11):
            continue
        (staging / repo / name).write_text("x")
        by_repo.setdefault(repo, {})[name] = staging / repo / name
    for repo, files in by_repo.items():
        _put_in_hub_cache(cache, repo, files)
    with pytest.raises(HubFilesMissing) as e:
        check_hub_cache(cache_dir=cache)
    msg = str(e.value)
    assert f"1 of them are not in the cache {cache} (first: {TRANSCODER_REPO}/{TRANSCODER_FILE.format(layer=11)})" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "download_commands" in msg
    check_hub_cache(layers=list(range(11)), cache_dir=cache)  # layers 0..10 are all there


def test_gpt2_small_without_the_hub_says_what_is_missing_and_writes_nothing(tmp_path):
    """``--model gpt2-small`` offline with an empty cache: one line naming the files and the fix, no traceback."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.cli", "trace", "--model", "gpt2-small", "--prompt", "Hello",
                           "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "GPT-2 small and its dictionaries need 42 files from the Hugging Face hub" in err
    assert "42 of them are not in the cache" in err and "(first: gpt2/config.json)" in err
    assert "connect to the hub once" in err and "huggingface-cli download" in err
    assert not out.exists()
