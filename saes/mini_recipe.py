"""The settings that built the shipped mini suite, and the routine that trains its dictionaries."""

from __future__ import annotations

from saes.lm import LMConfig

LM = LMConfig(n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=4096, n_ctx=256,
              steps=1400, batch_size=16, lr=3e-3, weight_decay=0.05, warmup_steps=100, seed=0)
EVAL_ROWS = 256
