"""The jaxtyping shape annotations of the public functions hold, checked at run time with beartype."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from jaxtyping import TypeCheckError, jaxtyped

from circuits import attribution, linear_model
from circuits.linear_model import LinearisedModel
from circuits.targets import FeatureTarget
from saes.testing import make_suite

beartype = pytest.importorskip("beartype").beartype


def checked(fn):
    return jaxtyped(typechecker=beartype)(fn)


def test_annotations_hold():
    suite = make_suite(n_layers=2, d_sae=32, seed=2)
    lm = LinearisedModel(suite, suite.tokens("import os\nfor i in range(3):"))
    B, P, d = 3, lm.n_pos, lm.cfg.d_model
    g = torch.randn(B, P, d)
    group = lm.feature_group("attn_feature", 1)
    assert checked(LinearisedModel.unit_dots)(lm, group, g).shape == (B, P, group.width)
    assert checked(LinearisedModel.write)(lm, group, torch.randn(B, P, group.width)).shape == (B, P, d)
    assert checked(LinearisedModel.ln)(lm, g, lm.scale_ln1[0]).shape == (B, P, d)
    assert checked(LinearisedModel.attn_z)(lm, 0, g).shape == (B, P, lm.cfg.n_heads * lm.cfg.d_head)
    assert checked(LinearisedModel.group_pre)(lm, group, g).shape == (B, P, group.width)
    assert checked(LinearisedModel.logits_from)(lm, g).shape == (B, P, lm.cfg.d_vocab)
    assert checked(LinearisedModel.residual)(lm, 3, batch=B).shape == (B, P, d)
    assert checked(LinearisedModel.table_dots)(lm, g, 3).shape[:2] == (B, P)
    index = attribution.NodeIndex(lm)
    readers = [FeatureTarget("mlp_feature", 1, int(lm.feature_group("mlp_feature", 1).feature[-1, 0]), P - 1)]
    rv = attribution.reading_vectors(lm, readers)
    assert checked(attribution.direct_effects)(lm, index, rv).shape == (1, index.n)
    assert checked(attribution.NodeIndex.unit_writes)(index, torch.arange(5)).shape == (5, d)
    assert checked(linear_model._vector_group)("embed", -1, 0, torch.randn(P, d)).direction.shape == (P, 1, d)
    # and a wrong shape is caught by the checker, before the arithmetic runs
    with pytest.raises(TypeCheckError):
        checked(LinearisedModel.ln)(lm, g, torch.ones(P + 1))
