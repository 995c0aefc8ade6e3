"""Exact feature-basis local circuits (see docs/circuits.md and docs/attribution.md).

- ``sites``: one vocabulary for dictionary names, hooks, node kinds, stages and rows, node ids, Neuronpedia types.
- ``linear_model``: the clean pass frozen into a model affine in its nodes (features, errors, embeddings).
- ``targets``: what a circuit explains, how each target reads the residual stream, the text form.
- ``attribution``: batched reading vectors and direct effects, hierarchical attribution, the certificate.
- ``qk``: exact (query node, key node) decomposition of an attention score.
- ``graph``: the ``Circuit`` (node table and sparse adjacency as tensors, ``Node``/``Edge`` views), its compact
  safetensors files, networkx, node-link JSON, GraphML, attribution-graph JSON.
- ``influence``: graph influence, replacement and completeness scores, pruning by influence.
- ``explorer_data``: the columnar payload the explorer page reads.
- ``faithfulness``: ablation curves in the real model with dictionaries spliced in.
- ``explorer``: the explorer page (``graph.html``).
- ``trace``: the whole pipeline for one prompt (what ``circuits trace`` calls).
"""
