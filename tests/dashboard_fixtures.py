"""Fixtures for the dashboard, scorecard and detector tests: a tiny suite with a planted detector."""

from __future__ import annotations

import torch

from analysis.scorecard import TokenClass, token_set_from_texts, vocab_texts
from saes.testing import TINY_TEXT, make_suite

PLANTED_FEATURE = 5


def planted_suite(text: str = "import", feature: int = PLANTED_FEATURE, seed: int = 0):
    """A tiny suite in which feature ``feature`` of transcoder ``mlp0`` fires on exactly the tokens whose stripped
    text is ``text``, and nowhere else.

    The wiring: residual dimension 0 holds 100 on those tokens and 0 on every other token (embedding column 0
    zeroed elsewhere, position embedding and the layer-0 attention output kept off dimension 0), so after
    LayerNorm dimension 0 of ``blocks.0.ln2.hook_normalized`` is about 3.9 on them (100 dominates the norm)
    and well under 1 elsewhere; the feature reads dimension 0 with a bias of -1.
    """
    suite = make_suite(seed=seed)
    model = suite.model
    members = [i for i, t in enumerate(vocab_texts(model.tokenizer, model.cfg.d_vocab)) if t.strip() == text]
    assert members, f"the tiny tokenizer has no token {text!r}"
    with torch.no_grad():
        model.embed.W_E[:, 0] = 0.0
        model.embed.W_E[members, 0] = 100.0
        model.pos_embed.W_pos[:, 0] = 0.0
        model.blocks[0].attn.W_O[..., 0] = 0.0
        model.blocks[0].attn.b_O[0] = 0.0
        tc = suite.transcoders[0]
        tc.W_enc[:, feature] = 0.0
        tc.W_enc[0, feature] = 1.0
        tc.b_enc[feature] = -1.0
    return suite, TokenClass(text, (text,)), members


def tiny_tokens(suite, copies: int = 3):
    return token_set_from_texts(suite.model, [TINY_TEXT] * copies)


def save_suite(suite, directory):
    """Write ``suite`` in the mini format (loadable with ``--suite-dir``)."""
    from saes.io import atomic_save_tensors, atomic_write_json, model_config_dict, save_dictionary

    suite.model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    # As saes.io.save_model, less the attention buffers (IGNORE is -inf, which read_tensors refuses).
    state = {k: v for k, v in suite.model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))}
    atomic_save_tensors(state, directory / "model.safetensors")
    atomic_write_json(directory / "cfg.json", model_config_dict(suite.model.cfg))
    for name, sae in suite.dictionaries().items():
        save_dictionary(sae, directory / "dictionaries" / name)
    return directory
