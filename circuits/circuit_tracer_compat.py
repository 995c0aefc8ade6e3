"""circuit-tracer's replacement model over a suite's own model and transcoders, for comparisons and benchmarks.

1. Convert each transcoder to circuit-tracer's ``SingleLayerTranscoder`` (its encoder is stored transposed,
   ``[d_transcoder, d_model]``; ``W_skip`` has the same layout on both sides) with the same activation:
   ``JumpReLU`` (equal to sae-lens's for thresholds >= 0, checked), ReLU, or circuit-tracer's ``TopK``
   followed by a ReLU (sae-lens's TopK keeps only positive values; circuit-tracer's alone keeps the k largest
   even when negative).
2. Gather them in a ``TranscoderSet`` reading ``ln2.hook_normalized`` and writing ``hook_mlp_out``; or, for a
   suite with a cross-layer transcoder (ReLU or JumpReLU), convert it to circuit-tracer's
   ``CrossLayerTranscoder`` (encoders transposed per layer, decoders in memory).
3. Build ``TransformerLensReplacementModel`` from the model's config, load the model's own (processed)
   ``state_dict`` into it, then configure it with the transcoder set. Both sides then run the same weights.

circuit-tracer 0.5 is an optional, test-only dependency (installed ``--no-deps``); it is imported here only.
See ``tests/test_circuit_tracer_agreement.py`` for how its conventions map onto this project's.
"""

from __future__ import annotations

import torch

from saes.dictionary import spec_of


def circuit_tracer_replacement_model(suite):
    """Steps 1-3: a circuit-tracer replacement model equivalent to ``suite`` with its transcoders only."""
    try:
        from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
        from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
        from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    except ImportError as e:
        raise ImportError(f"circuit-tracer is not installed ({e}); install it with `pip install --no-deps circuit-tracer==0.5.0`") from None
    model = suite.model
    if getattr(suite, "clt", None) is not None:
        return _configured(model, _circuit_tracer_clt(suite.clt, model))
    missing = [l for l in range(model.cfg.n_layers) if l not in suite.transcoders]
    if missing:
        raise ValueError(f"circuit-tracer needs a transcoder at every layer; suite {suite.name!r} has none at layers {missing}")
    layers = {}
    for layer, tc in suite.transcoders.items():
        spec = spec_of(tc)
        if spec.activation == "jumprelu":
            if float(tc.threshold.detach().min()) < 0:
                raise ValueError(f"mlp{layer} has negative JumpReLU thresholds, where circuit-tracer's JumpReLU differs from sae-lens's")
            act = JumpReLU(tc.threshold.detach().clone())
        elif spec.activation == "topk":
            act = torch.nn.Sequential(TopK(spec.k), torch.nn.ReLU())
        else:
            act = torch.nn.ReLU()
        W_skip = getattr(tc, "W_skip", None)
        ct = SingleLayerTranscoder(model.cfg.d_model, tc.cfg.d_sae, act, layer, skip_connection=W_skip is not None,
                                   device=torch.device(model.cfg.device), dtype=model.cfg.dtype)
        with torch.no_grad():
            if W_skip is not None:
                ct.W_skip.copy_(W_skip)  # both compute x @ W_skip.T
            ct.W_enc.copy_(tc.W_enc.T)
            ct.W_dec.copy_(tc.W_dec)
            ct.b_enc.copy_(tc.b_enc)
            ct.b_dec.copy_(tc.b_dec)
        layers[layer] = ct
    skips = {getattr(tc, "W_skip", None) is not None for tc in suite.transcoders.values()}
    if len(skips) > 1:
        raise ValueError("circuit-tracer needs every transcoder of a set with a skip connection, or none")
    transcoders = TranscoderSet(layers, feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out")
    return _configured(model, transcoders)


def _circuit_tracer_clt(clt, model):
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTCrossLayerTranscoder

    activation = clt.cfg.activation
    if activation not in ("relu", "jumprelu"):
        raise ValueError(f"circuit-tracer's cross-layer transcoders are ReLU or JumpReLU; this one is {activation}")
    if activation == "jumprelu" and float(clt.threshold.detach().min()) < 0:
        raise ValueError("the CLT has negative JumpReLU thresholds, where circuit-tracer's JumpReLU differs")
    ct = CTCrossLayerTranscoder(clt.n_layers, clt.cfg.d_sae, clt.cfg.d_model,
                                activation_function="jump_relu" if activation == "jumprelu" else "relu",
                                lazy_decoder=False, feature_input_hook="ln2.hook_normalized",
                                feature_output_hook="hook_mlp_out", device=torch.device(model.cfg.device),
                                dtype=model.cfg.dtype)
    with torch.no_grad():
        ct.W_enc.copy_(clt.W_enc.transpose(1, 2))  # circuit-tracer: [n_layers, d_transcoder, d_model]
        ct.b_enc.copy_(clt.b_enc)
        ct.b_dec.copy_(clt.b_dec)
        for l in range(clt.n_layers):
            ct.W_dec[l].copy_(clt.W_dec[l])
        if activation == "jumprelu":
            ct.activation_function.threshold.copy_(clt.threshold[:, None, :])
    return ct


def _configured(model, transcoders):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel

    replacement = TransformerLensReplacementModel(model.cfg, tokenizer=model.tokenizer)
    missing_keys, unexpected = replacement.load_state_dict(model.state_dict(), strict=False)
    if missing_keys or unexpected:
        raise ValueError(f"the model's weights do not fit circuit-tracer's model: missing {missing_keys}, unexpected {unexpected}")
    replacement._configure_replacement_model(transcoders)
    return replacement
