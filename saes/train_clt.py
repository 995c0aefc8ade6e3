"""Training a cross-layer transcoder (``saes/clt.py``) as BatchTopK, used afterwards as JumpReLU.

Per step, on a batch of every layer's MLP input ``x_L`` and MLP output ``y_L`` (``[batch, d_model]`` each):

1. Encode each source layer: ``pre_L = x_L W_enc[L] + b_enc[L]``; keep the ``k * batch`` largest
   ``relu(pre_L)`` of the whole batch (BatchTopK, Bussmann et al. 2024: mean L0 ``k`` per layer and token).
2. Decode every layer: ``recon_T = b_dec[T] + sum_{L <= T} acts_L W_dec[L][:, T - L]``.
3. Loss: the mean over layers of the normalised MSE ``|y_T - recon_T|^2 / |y_T - mean|^2``.
4. Adam step with the schedule of ``saes/train.py`` (linear warm-up, linear decay over the last
   ``decay_fraction``); afterwards each feature's decoder (all its target layers together) is rescaled to unit
   norm, so the activations carry the scale.
5. Track each layer's inference threshold: an exponential average (rate ``threshold_rate``) of the smallest
   activation kept in the batch. The trained CLT is a JumpReLU CLT with those thresholds (non-negative), so it
   fires on about ``k`` features a layer and token without looking at the batch, and it is exactly what
   circuit-tracer's JumpReLU CLT computes from the same tensors.

Seeded: the initialisation comes from ``cfg.seed``; the batches from the caller's seeded iterator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import Tensor

from saes.clt import CLTConfig, CrossLayerTranscoder
from saes.train import TrainConfig

log = logging.getLogger(__name__)


def build_clt(n_layers: int, d_model: int, d_sae: int, seed: int = 0, model_name: str = "",
              dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """A new JumpReLU CLT: unit-norm random decoders, encoders the transpose of each feature's first write."""
    clt = CrossLayerTranscoder(CLTConfig(n_layers, d_model, d_sae, activation="jumprelu", model_name=model_name), dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for src in range(n_layers):
            w = torch.randn(d_sae, n_layers - src, d_model, generator=gen, dtype=torch.float64)
            w /= w.flatten(1).norm(dim=-1)[:, None, None]
            clt.W_dec[src].copy_(w.to(dtype))
            clt.W_enc[src].copy_((w[:, 0, :] / w[:, 0, :].norm(dim=-1, keepdim=True)).T.to(dtype))
    return clt


@dataclass
class CLTTrainResult:
    history: list[dict] = field(default_factory=list)  # {"step", "mse", "l0"} every ``log_every`` steps


def _batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(activations with the ``k * batch`` largest relu(pre) of the batch kept, the smallest value kept)."""
    act = pre.relu()
    flat = act.flatten()
    n_keep = min(flat.numel(), k * pre.shape[0])
    vals, idx = flat.topk(n_keep)
    kept = torch.zeros_like(flat).scatter(0, idx, vals).view_as(act)
    positive = vals[vals > 0]
    return kept, (positive.min() if len(positive) else pre.new_zeros(()))


def train_clt(clt: CrossLayerTranscoder, batches: Iterable, cfg: TrainConfig, k: int, progress: bool = True,
              log_every: int = 50) -> CLTTrainResult:
    """Train ``clt`` in place on ``cfg.steps`` batches of ``(inputs, outputs)``, each ``[n_layers, batch, d_model]``."""
    from tqdm.auto import tqdm

    if clt.cfg.activation != "jumprelu":
        raise ValueError(f"train_clt trains a JumpReLU CLT as BatchTopK; this one is {clt.cfg.activation!r} (use build_clt)")
    if not 0 < k <= clt.cfg.d_sae:
        raise ValueError(f"k (the mean L0 per layer) must be in 1..{clt.cfg.d_sae}, got {k}")
    n = clt.n_layers
    params = [clt.W_enc, clt.b_enc, *clt.W_dec, clt.b_dec]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    threshold = torch.zeros(n, dtype=clt.W_enc.dtype)
    result = CLTTrainResult()
    it: Iterator = iter(batches)
    bar = tqdm(total=cfg.steps, disable=not progress, desc="train CLT")
    for step in range(cfg.steps):
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"the batch iterator ran out after {step} of {cfg.steps} steps") from None
        x, y = x.to(clt.W_enc.dtype), y.to(clt.W_enc.dtype)
        if x.shape[0] != n or y.shape[0] != n:
            raise ValueError(f"a CLT batch holds all {n} layers first: got inputs {tuple(x.shape)}, outputs {tuple(y.shape)}")
        if step == 0 and cfg.init_b_dec_from_data:
            with torch.no_grad():
                clt.b_dec.copy_(y.mean(1))
                clt.b_enc.copy_(-torch.einsum("ld,ldf->lf", x.mean(1), clt.W_enc))
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        decay_start = cfg.steps * (1 - cfg.decay_fraction)
        decay = 1.0 if step < decay_start else max(0.0, (cfg.steps - step) / max(1.0, cfg.steps - decay_start))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * decay
        acts, smallest = [], []
        for layer in range(n):
            a, s = _batch_topk(clt.pre_activation(layer, x[layer]), k)
            acts.append(a)
            smallest.append(s.detach())
        recon = clt.decode(acts)
        mses = [(y[t] - recon[t]).pow(2).sum(-1).mean() / (y[t] - y[t].mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
                for t in range(n)]
        loss = torch.stack(mses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for src in range(n):
                w = clt.W_dec[src]
                w /= w.flatten(1).norm(dim=-1).clamp_min(1e-8)[:, None, None]
            rate = 1.0 if step == 0 else cfg.threshold_rate
            threshold.mul_(1 - rate).add_(rate * torch.stack(smallest))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            l0 = float(torch.stack([(a > 0).float().sum(-1).mean() for a in acts]).mean())
            result.history.append({"step": step + 1, "mse": float(loss.detach()), "l0": l0})
            bar.set_postfix(mse=f"{float(loss.detach()):.3f}")
        bar.update(1)
    bar.close()
    with torch.no_grad():
        clt.threshold.copy_(threshold[:, None].expand_as(clt.threshold))
    for p in clt.parameters():
        p.requires_grad_(False)
    return result
