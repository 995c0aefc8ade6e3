"""GPT-2 small itself, end to end through a Hugging Face cache of our own, on random weights.

``tests/test_pretrained.py`` checks the two dictionary loaders offline. This file adds the model: it writes a
repository in the published format of the hub's ``gpt2`` (openai-community/gpt2), which is what TransformerLens
resolves ``"gpt2-small"`` to (``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` on ``"gpt2"``):
``config.json`` with GPT-2 small's real values, ``generation_config.json``, ``tokenizer_config.json``,
``vocab.json`` + ``merges.txt`` and ``model.safetensors``: float32, GPT-2's own key names (no ``transformer.``
prefix, no ``lm_head.weight`` because the unembedding is tied to ``wte``, and the ``h.L.attn.bias`` causal-mask
buffers, as in the published file), at the real shapes (124M parameters, about 550 MB on disk). The tokenizer is a
small but valid byte-level BPE: the 256 byte symbols in GPT-2's id order, 150 merges learned here, and
``<|endoftext|>`` at GPT-2's id 50256.

TransformerLens reads the official config, so the model has all 12 layers; the dictionaries are tiny (64
features) so that the whole suite (12 attention SAEs and 12 transcoders) fits in little memory. In a subprocess
with ``HF_HUB_OFFLINE=1`` and the private cache it runs, unchanged: ``load_suite("gpt2-small")`` (the processing
flags are checked on the loaded model), ``circuits suite-eval --model gpt2-small --text FILE`` and ``circuits
trace --model gpt2-small``.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from saes.pretrained import TRANSCODER_FILE, TRANSCODER_REPO
from test_pretrained import _put_in_hub_cache, write_kk_files, write_transcoder_file

ROOT = Path(__file__).resolve().parents[1]
KK_REPO = "ckkissane/attn-saes-gpt2-small-all-layers"
EOT_ID = 50256

# openai-community/gpt2's config.json, value for value.
GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
    "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 50256, "eos_token_id": 50256,
                     "transformers_version": "4.26.0.dev0"}
TOKENIZER_CONFIG = {"model_max_length": 1024}

TEXT = (
    "The quick brown fox jumps over the lazy dog. A sparse dictionary reads the activations of a transformer and "
    "writes them back as a sum of features; the circuit of a feature is the set of earlier features whose "
    "contributions add up to its activation, exactly, once attention patterns and layer norms are frozen. "
    "In the beginning the model was random, and every number it produced was finite all the same.\n"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> symbol table; its order (printable bytes first) is the order of ids 0..255 in vocab.json."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(text: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE in GPT-2's layout, learned greedily (ties broken by the pair itself: deterministic)."""
    import regex

    b2u = bytes_to_unicode()
    vocab = {sym: i for i, sym in enumerate(b2u.values())}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    words = Counter(tuple(b2u[b] for b in w.encode()) for w in pat.findall(text))
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    vocab["<|endoftext|>"] = EOT_ID
    return vocab, merges


def gpt2_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published file's key names and shapes (Conv1D weights are [in, out])."""
    gen = torch.Generator().manual_seed(seed)
    d, n_ctx, vocab = GPT2_CONFIG["n_embd"], GPT2_CONFIG["n_positions"], GPT2_CONFIG["vocab_size"]

    def w(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    def ln(prefix):  # LayerNorm weights away from 1 so that fold_ln has something to fold
        return {f"{prefix}.weight": 1 + w(d, std=0.1), f"{prefix}.bias": w(d)}

    sd = {"wte.weight": w(vocab, d), "wpe.weight": w(n_ctx, d, std=0.01), **ln("ln_f")}
    mask = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
    for L in range(GPT2_CONFIG["n_layer"]):
        p = f"h.{L}"
        sd |= ln(f"{p}.ln_1") | ln(f"{p}.ln_2")
        sd |= {f"{p}.attn.bias": mask.clone(),
               f"{p}.attn.c_attn.weight": w(d, 3 * d), f"{p}.attn.c_attn.bias": w(3 * d),
               f"{p}.attn.c_proj.weight": w(d, d), f"{p}.attn.c_proj.bias": w(d),
               f"{p}.mlp.c_fc.weight": w(d, 4 * d), f"{p}.mlp.c_fc.bias": w(4 * d),
               f"{p}.mlp.c_proj.weight": w(4 * d, d), f"{p}.mlp.c_proj.bias": w(d)}
    return sd


def write_gpt2_repo(staging: Path, seed: int = 0) -> dict[str, Path]:
    """The files of the hub's ``gpt2`` repository that loading it needs, in their published formats."""
    from safetensors.torch import save_file

    staging.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, obj in (("config.json", GPT2_CONFIG), ("generation_config.json", GENERATION_CONFIG),
                      ("tokenizer_config.json", TOKENIZER_CONFIG)):
        (staging / name).write_text(json.dumps(obj, indent=2))
        files[name] = staging / name
    vocab, merges = learn_bpe(TEXT, 150)
    (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (staging / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    files["vocab.json"], files["merges.txt"] = staging / "vocab.json", staging / "merges.txt"
    sd = gpt2_state_dict(seed)
    save_file(sd, staging / "model.safetensors", metadata={"format": "pt"})
    del sd
    files["model.safetensors"] = staging / "model.safetensors"
    return files


def test_tokenizer_files_are_a_valid_gpt2_bpe(tmp_path):
    """Cheap: the BPE written for the fake repo round-trips text in transformers, with ids below 50257."""
    from transformers import GPT2TokenizerFast

    vocab, merges = learn_bpe(TEXT, 150)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    ids = tok.encode(TEXT + "Ünïcödé ✓ 12345")
    assert max(ids) < GPT2_CONFIG["vocab_size"] and len(ids) < len((TEXT + "Ünïcödé ✓ 12345").encode())
    assert tok.decode(ids) == TEXT + "Ünïcödé ✓ 12345"
    assert tok.bos_token_id == tok.eos_token_id == EOT_ID
    assert len(merges) == 150 and sorted(vocab.values()) == [*range(len(vocab) - 1), EOT_ID]


def test_gpt2_small_dictionaries_fit_gpt2_without_a_name_warning(caplog):
    """TransformerLens calls the model "gpt2"; the dictionaries' "gpt2-small" is its alias, not another model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saes.pretrained import transcoder_from_state_dict
    from saes.suite import check_fits

    cfg = HookedTransformerConfig(n_layers=1, d_model=768, n_heads=12, d_head=64, d_mlp=32, d_vocab=10, n_ctx=4,
                                  act_fn="gelu_new", model_name="gpt2")
    model = HookedTransformer(cfg)
    state = {"W_enc": torch.zeros(768, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 768),
             "b_dec": torch.zeros(768), "b_dec_out": torch.zeros(768)}
    with caplog.at_level("WARNING", logger="saes.suite"):
        check_fits(model, transcoder_from_state_dict(state, layer=0))
        assert not caplog.records
        check_fits(model, transcoder_from_state_dict(state, layer=0, model_name="gpt2-medium"))
    assert "trained on 'gpt2-medium'" in caplog.text


SUITE_SCRIPT = r"""
import json, logging, math, sys, torch
from saes.pretrained import GPT2_PROCESSING
from saes.suite import load_suite, check_fits
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("saes.suite").addHandler(handler)
suite = load_suite("gpt2-small")
# TransformerLens names the model "gpt2"; the dictionaries say "gpt2-small": the same model, no warning
assert not warnings, warnings
m = suite.model
assert suite.name == "gpt2-small" and m.cfg.n_layers == 12 and m.cfg.d_model == 768 and m.cfg.d_vocab == 50257, m.cfg
assert m.cfg.original_architecture == "GPT2LMHeadModel", m.cfg.original_architecture
# the processing the dictionaries were trained under: LayerNorm weights folded, writing weights centred
assert m.cfg.normalization_type == "LNPre", m.cfg.normalization_type
assert all(m.W_out[l].mean(-1).abs().max() < 1e-5 for l in range(12))
assert m.W_U.mean(-1).abs().max() < 1e-5
assert m.b_V.abs().max() == 0  # value biases folded into b_O
assert sorted(suite.dictionaries()) == sorted([f"attn{l}" for l in range(12)] + [f"mlp{l}" for l in range(12)])
for sae in suite.dictionaries().values():
    check_fits(m, sae)
toks = suite.tokens("The quick brown fox")
assert toks[0, 0].item() == 50256 and toks.max().item() < 50257
logits = m(toks)
assert torch.isfinite(logits).all()
print(json.dumps({"info": {k: v for k, v in suite.info.items() if k != "processing"}, "processing": suite.info["processing"],
                  "tokens": toks.tolist()}))
"""


def _gpt2_cache(tmp_path: Path, d_sae: int = 64) -> dict[str, str]:
    """A Hugging Face cache holding the gpt2 repository and all 24 dictionaries; the environment to use it."""
    cache, staging = tmp_path / "hub", tmp_path / "staging"
    _put_in_hub_cache(cache, "gpt2", write_gpt2_repo(staging / "gpt2"))
    for layer in range(12):
        kk_name, _ = write_kk_files(staging / "kk", layer, d_sae, seed=layer)
        cfg_name = kk_name.split(".pt")[0] + "_cfg.json"
        _put_in_hub_cache(cache, KK_REPO, {kk_name: staging / "kk" / kk_name, cfg_name: staging / "kk" / cfg_name})
        tc_name = TRANSCODER_FILE.format(layer=layer)
        write_transcoder_file(staging / "tc" / tc_name, d_sae=d_sae, layer=layer, seed=100 + layer)
        _put_in_hub_cache(cache, TRANSCODER_REPO, {tc_name: staging / "tc" / tc_name})
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture
def gpt2_hub_env(tmp_path):
    """The environment of a private hub cache with gpt2 and its dictionaries; its 550 MB are deleted afterwards."""
    try:
        yield _gpt2_cache(tmp_path)
    finally:
        shutil.rmtree(tmp_path / "hub", ignore_errors=True)
        shutil.rmtree(tmp_path / "staging", ignore_errors=True)


@pytest.mark.slow
def test_gpt2_small_suite_end_to_end_through_a_hub_cache(tmp_path, gpt2_hub_env):
    """About 2 minutes of CPU time; writes and deletes 550 MB."""
    env = gpt2_hub_env

    # 1. load_suite("gpt2-small"): the model with its processing, all 24 dictionaries, each fitting the model
    loaded = json.loads(_run(["-c", SUITE_SCRIPT], env).strip().splitlines()[-1])
    assert loaded["processing"] == dict(fold_ln=True, center_writing_weights=True, center_unembed=True,
                                        fold_value_biases=True)
    assert loaded["info"]["transcoder_repo"] == TRANSCODER_REPO

    # 2. circuits suite-eval --model gpt2-small on a text file (the default, OpenWebText, needs the network)
    text = tmp_path / "eval.txt"
    text.write_text(TEXT * 6)
    _run(["-m", "scripts.cli", "suite-eval", "--model", "gpt2-small", "--device", "cpu", "--text", str(text),
          "--rows", "1", "--ce-rows", "1", "--json", "--no-progress", "--out", str(tmp_path / "eval")], env)
    report = json.loads((tmp_path / "eval" / "suite_eval.json").read_text())
    m = report["model"]
    assert (m["name"], m["n_layers"], m["d_model"], m["d_vocab"], m["heldout_tokens"]) == ("gpt2-small", 12, 768, 50257, 256)
    assert _finite(m["heldout_loss"]) and m["heldout_loss"] > 0
    assert [d["name"] for d in report["dictionaries"]] == [f"{k}{l}" for l in range(12) for k in ("attn", "mlp")]
    for d in report["dictionaries"]:
        assert d["d_sae"] == 64
        for key in ("l0", "explained_variance", "dead_fraction", "ce_loss_recovered"):
            assert _finite(d[key]), (d["name"], key, d[key])

    # 3. circuits trace --model gpt2-small: an exact circuit on the random weights
    out = tmp_path / "trace"
    _run(["-m", "scripts.cli", "trace", "--model", "gpt2-small", "--device", "cpu", "--prompt", "The quick brown fox",
          "--threshold", "0.05", "--no-faithfulness", "--no-progress", "--out", str(out)], env)
    graph = json.loads((out / "graph.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    residual = graph["graph"]["max_relative_residual"]
    assert _finite(residual) and residual <= 1e-4, residual
    assert summary["model"] == "gpt2-small" and _finite(summary["target_value"]) and summary["target_value"] != 0
    assert summary["target"].startswith("mlp11:"), summary["target"]
    assert len(graph["nodes"]) > 1 and len(graph["edges"]) > 0
    assert all(_finite(v) for v in summary["scores"].values())
    for name in ("graph.graphml", "attribution_graph.json", "graph.html"):
        assert (out / name).stat().st_size > 0
