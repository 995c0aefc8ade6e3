"""Exact feature-basis local circuits (see docs/circuits.md and ../shared/docs/ATTRIBUTION.md).

- ``linear_model``: the clean pass frozen into a model affine in its nodes (features, errors, embeddings).
- ``targets``: what a circuit explains, how each target reads the residual stream, the text form.
- ``attribution``: batched reading vectors and direct effects, hierarchical attribution, the certificate.
- ``qk``: exact (query node, key node) decomposition of an attention score.
- ``graph``: the ``Circuit`` object, networkx, node-link JSON, GraphML, attribution-graph JSON.
- ``influence``: influence, replacement and completeness scores, pruning by influence.
- ``faithfulness``: ablation curves in the real model with dictionaries spliced in.
- ``viewer``: a self-contained plotly page.
- ``trace``: the whole pipeline for one prompt (what ``circuits trace`` calls).
"""
