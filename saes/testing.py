"""Tiny, seeded models, tokenizers, dictionaries and suites: the fixtures of every layer's tests.

``make_suite()`` gives a complete suite (model processed like GPT-2 small, an attention SAE and a
transcoder per layer) in well under a second, with random non-zero biases everywhere so that tests of
constants and LayerNorm folding can fail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from saes.dictionary import DictionarySpec, build_dictionary
from saes.suite import Suite

TINY_TEXT = (
    "import os\nimport sys\nfor i in range(10):\n    print(i)\n"
    "The cat sat on the mat. The dog ran. It was late.\n"
    "def f(x):\n    return x + 1\nclass A:\n    pass\n"
) * 4
_TOKENIZER_DIRS: dict[int, Path] = {}


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on a few lines of code and English (cached per process)."""
    from saes.tokenizer import load_tokenizer, train_bpe

    if vocab_size not in _TOKENIZER_DIRS:
        directory = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
        train_bpe([TINY_TEXT], vocab_size, directory)
        _TOKENIZER_DIRS[vocab_size] = directory
    return load_tokenizer(_TOKENIZER_DIRS[vocab_size])


def make_model(n_layers: int = 2, d_model: int = 16, n_heads: int = 2, d_head: int = 8, d_mlp: int = 32,
               n_ctx: int = 32, seed: int = 0, processed: bool = True, dtype: torch.dtype = torch.float32,
               tokenizer=None):
    """A random GPT-2-architecture HookedTransformer; every weight and bias non-zero; processed like GPT-2."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saes.lm import process_weights

    tokenizer = tokenizer or make_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, n_ctx=n_ctx,
        d_vocab=len(tokenizer), act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
        model_name=f"tiny-{n_layers}l-{d_model}d", original_architecture="GPT2LMHeadModel", seed=seed,
        default_prepend_bos=True, dtype=dtype,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # LayerNorm scales near 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
            else:
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) / max(p.shape[0], 1) ** 0.5).to(dtype))
    if processed:
        process_weights(model)
    model.eval()
    return model


def make_dictionary(model, kind: str, layer: int, d_sae: int = 64, activation: str = "relu", k: int | None = None,
                    seed: int = 0, bias_scale: float = 0.1):
    """A random dictionary that fits ``model`` at ``layer``, with random non-zero biases."""
    cfg = model.cfg
    if kind == "attn_sae":
        spec = DictionarySpec.attn_sae(layer, cfg.n_heads * cfg.d_head, d_sae, activation=activation, k=k, model_name=cfg.model_name)
    else:
        spec = DictionarySpec.transcoder(layer, cfg.d_model, d_sae, activation=activation, k=k, model_name=cfg.model_name)
    sae = build_dictionary(spec, seed=seed, dtype=cfg.dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(bias_scale * torch.randn(sae.b_enc.shape, generator=gen, dtype=torch.float64).to(cfg.dtype))
        sae.b_dec.copy_(bias_scale * torch.randn(sae.b_dec.shape, generator=gen, dtype=torch.float64).to(cfg.dtype))
        sae.W_enc.mul_(1 + 0.5 * torch.rand(sae.W_enc.shape, generator=gen, dtype=torch.float64).to(cfg.dtype))
        if activation == "jumprelu":
            sae.threshold.copy_(bias_scale * torch.rand(sae.threshold.shape, generator=gen, dtype=torch.float64).to(cfg.dtype))
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def make_suite(n_layers: int = 2, d_model: int = 16, n_heads: int = 2, d_head: int = 8, d_mlp: int = 32,
               d_sae: int = 64, activation: str = "relu", k: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Suite:
    """A complete tiny suite: model plus an attention SAE and a transcoder at every layer."""
    model = make_model(n_layers, d_model, n_heads, d_head, d_mlp, seed=seed, dtype=dtype)
    attn = {l: make_dictionary(model, "attn_sae", l, d_sae, activation, k, seed=seed + 10 + l) for l in range(n_layers)}
    mlp = {l: make_dictionary(model, "transcoder", l, d_sae, activation, k, seed=seed + 100 + l) for l in range(n_layers)}
    return Suite(name=model.cfg.model_name, model=model, attn_saes=attn, transcoders=mlp, info={"tiny": True})


def dense_trainer_loss(trainer, x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dense activations) of a TopK or BatchTopK ``DictionaryTrainer`` step, the plain dense way.

    The reference that ``DictionaryTrainer.loss`` (sparse codes, ``embedding_bag`` decoding) is tested and
    benchmarked against: the flat top ``k * batch`` of the whole ``[batch, d_sae]`` code for BatchTopK, and both
    decodes (reconstruction and AuxK) as dense matmuls.
    """
    from saes.dictionary import activate, pre_activation

    sae, cfg = trainer.sae, trainer.cfg
    pre = pre_activation(sae, x_in)
    if trainer.batch_topk:
        flat = pre.relu().flatten()
        vals, idx = flat.topk(min(int(sae.cfg.metadata["batch_topk_k"]) * pre.shape[0], flat.numel()))
        acts = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
    else:
        acts = activate(sae, pre)
    recon = acts @ sae.W_dec + sae.b_dec
    denom = (x_out - x_out.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    residual = x_out - recon
    mse = residual.pow(2).sum(-1).mean() / denom
    dead = trainer.since_fired >= cfg.dead_after_tokens
    if not dead.any():
        return mse, acts
    k_aux = min(cfg.aux_k or max(1, sae.cfg.d_in // 2), int(dead.sum()))
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    aux = (residual.detach() - aux_acts @ sae.W_dec).pow(2).sum(-1).mean() / denom
    return mse + cfg.aux_coefficient * aux, acts
