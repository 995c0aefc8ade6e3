"""One trainer for every dictionary: ReLU + L1, TopK, BatchTopK and JumpReLU SAEs, and transcoders (input hook ->
output hook).

Algorithm (per step, on a batch of activations ``x_in`` and targets ``x_out``; for an SAE ``x_out = x_in``):
1. Encode and decode in canonical form (``saes/dictionary.py``): ``pre = x_in W_enc + b_enc``,
   ``acts = relu(pre)`` or TopK, ``recon = acts W_dec + b_dec``. A JumpReLU dictionary with a BatchTopK
   target ``k`` trains as BatchTopK: the ``k * batch`` largest ``relu(pre)`` of the whole batch are kept.
   A JumpReLU dictionary without one trains directly (``l0_coefficient``; Rajamanoharan et al. 2024):
   ``acts = pre * H(pre - theta)`` with a learned threshold ``theta = exp(log_theta)`` per latent.
2. Loss = normalised MSE ``|x_out - recon|^2 / |x_out - mean|^2`` plus
   - ReLU: ``l1_coefficient * sum_i acts_i * |W_dec[i]|`` (the decoder-norm-weighted L1 of Anthropic's
     April 2024 update, so the penalty cannot be dodged by shrinking the encoder and growing the decoder);
   - JumpReLU: ``l0_coefficient * sum_i H(pre_i - theta_i)``, the L0 itself. The step function has no
     gradient, so the thresholds learn through straight-through pseudo-derivatives (a rectangle kernel of
     width ``jumprelu_bandwidth`` around each threshold), in both this term and the JumpReLU itself;
   - TopK and BatchTopK: ``aux_coefficient *`` the AuxK loss of Gao et al. 2024: the top ``aux_k`` *dead* latents
     reconstruct the residual ``x_out - recon``, which gives dead latents a gradient and revives them;
   - Matryoshka (``matryoshka``, TopK and BatchTopK): the MSE is averaged with the MSEs of reconstructions from
     only the first ``m`` latents, for each prefix size ``m``, so early latents must stand alone (general
     features) and later ones refine them, instead of absorbing one another.
   A skip transcoder (``W_skip``, sae-lens's ``SkipTranscoder``) adds ``x_in W_skip^T`` to the reconstruction;
   ``W_skip`` starts at zero and trains with the rest, unpenalised (Paulo et al. 2025).
3. Adam step with linear warm-up and a linear decay over the last ``decay_fraction`` of steps; for TopK,
   BatchTopK and JumpReLU the decoder rows are kept at unit norm (the activations carry the scale). BatchTopK also
   tracks its inference threshold: an exponential average (rate ``threshold_rate``) of the smallest
   activation kept in each batch, written into the JumpReLU ``threshold`` of every feature, so that the
   trained dictionary fires, on average, on about ``k`` features a token without looking at the batch.
4. Track, per latent, how many tokens ago it last fired; latents silent for ``dead_after_tokens`` are dead.
   Optionally (``resample_every``) re-initialise dead latents towards badly reconstructed inputs
   (Anthropic's resampling), with their Adam state reset.

TopK and BatchTopK steps never build the dense ``[batch, d_sae]`` code: the kept latents are held flat, row by
row (``Codes``), and decoded with a weighted ``embedding_bag``, so decoding and the AuxK loss cost
``O(batch * k * d_out)`` instead of a dense matmul. The batch's top ``k * batch`` comes from each row's top
candidates, widened for the rows that could hide more (exactly the flat top-k; ``_batch_topk_codes``).
``python -m scripts.bench_train`` times it against the dense step.

The trainer is fed by any iterator of tensors (``x`` or ``(x_in, x_out)``, shape ``[batch, d]``), so the toy
models, MNIST and the language-model suites all use it. It is seeded and resumable: ``save_checkpoint`` and
``load_checkpoint`` round-trip the dictionary, the optimiser, the step and the firing counters.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from saes.dictionary import activate, decode, pre_activation
from saes.io import atomic_save_tensors, atomic_write_json, read_json, read_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    l1_coefficient: float = 1.0
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 100_000
    resample_every: int | None = None
    resample_until: float = 0.6
    threshold_rate: float = 0.01
    init_b_dec_from_data: bool = True
    seed: int = 0
    # Matryoshka (Bussmann et al. 2025; Nabeshima 2024): also reconstruct from the first m latents alone, for each m
    # here (increasing, below d_sae), and average those losses with the full one; TopK and BatchTopK only.
    matryoshka: tuple[int, ...] | None = None
    # JumpReLU trained directly (a JumpReLU dictionary without a BatchTopK target): the L0 penalty's weight, the
    # width of the straight-through kernel around each threshold, and the thresholds' starting value (sae-lens 6's
    # defaults for the last two; both are in units of the pre-activations, so they depend on the input's scale).
    l0_coefficient: float | None = None
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.l1_coefficient < 0 or self.aux_coefficient < 0:
            raise ValueError("l1_coefficient and aux_coefficient must be >= 0")
        if not 0 < self.threshold_rate <= 1:
            raise ValueError(f"threshold_rate must be in (0, 1], got {self.threshold_rate}")
        if self.resample_every is not None and self.resample_every <= 0:
            raise ValueError(f"resample_every must be positive or None, got {self.resample_every}")
        if self.l0_coefficient is not None and not (self.l0_coefficient > 0 and math.isfinite(self.l0_coefficient)):
            raise ValueError(f"l0_coefficient must be a positive finite number or None, got {self.l0_coefficient}")
        if not (self.jumprelu_bandwidth > 0 and self.jumprelu_init_threshold > 0):
            raise ValueError("jumprelu_bandwidth and jumprelu_init_threshold must be positive, got "
                             f"{self.jumprelu_bandwidth} and {self.jumprelu_init_threshold}")
        if self.matryoshka is not None:
            object.__setattr__(self, "matryoshka", tuple(int(m) for m in self.matryoshka))
            m = self.matryoshka
            if not m or m[0] <= 0 or any(b <= a for a, b in zip(m, m[1:])):
                raise ValueError(f"matryoshka must be increasing positive prefix sizes, e.g. (128, 512), got {m}")


@dataclass
class StepStats:
    step: int
    loss: float
    mse: float
    l0: float
    dead_fraction: float


@dataclass
class TrainResult:
    history: list[StepStats] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [asdict(s) for s in self.history]


def _as_pair(batch) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)):
        x_in, x_out = batch
    else:
        x_in = x_out = batch
    return x_in, x_out


def _kernel(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """The rectangle kernel ``K((pre - theta) / bandwidth) / bandwidth`` of the straight-through estimator."""
    return ((pre - theta).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)``; its gradient in ``pre`` is the step, in ``theta`` ``-theta * K(.)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        d_pre = grad * (pre > theta)
        d_theta = (-theta * _kernel(pre, theta, ctx.bandwidth) * grad).sum(0)
        return d_pre, d_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)``; no gradient in ``pre``, ``-K(.)`` in ``theta``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        return None, (-_kernel(pre, theta, ctx.bandwidth) * grad).sum(0), None


@dataclass
class Codes:
    """A batch's sparse code, flat and row by row: latent ``indices[j]`` has value ``values[j]`` in row ``rows[j]``.

    ``rows`` is non-decreasing and a row's indices are distinct (they come from a top-k), and only positive values
    are held (a ReLU zero contributes nothing to the reconstruction and gets no gradient).
    """

    values: Tensor  # [nnz], > 0
    indices: Tensor  # [nnz], long
    rows: Tensor  # [nnz], long, non-decreasing
    n_rows: int

    @classmethod
    def from_slots(cls, values: Tensor, indices: Tensor) -> "Codes":
        """From per-row slots (``[batch, width]`` values and latent indices), keeping the positive values."""
        keep = values > 0
        rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
        return cls(values[keep], indices[keep], rows[keep], values.shape[0])

    def decode(self, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        offsets = counts.cumsum(0) - counts
        out = F.embedding_bag(self.indices, W_dec, offsets, mode="sum", per_sample_weights=self.values)
        return out if b_dec is None else out + b_dec

    def prefix(self, m: int) -> "Codes":
        """The code restricted to latents ``0 .. m-1`` (a Matryoshka prefix)."""
        keep = self.indices < m
        return Codes(self.values[keep], self.indices[keep], self.rows[keep], self.n_rows)

    def dense(self, d_sae: int) -> Tensor:
        out = self.values.new_zeros(self.n_rows, d_sae)
        return out.index_put((self.rows, self.indices), self.values)

    def fired(self, d_sae: int) -> Tensor:
        out = torch.zeros(d_sae, dtype=torch.bool, device=self.values.device)
        out[self.indices] = True
        return out

    def l0(self) -> float:
        return self.values.numel() / max(1, self.n_rows)

    def smallest_kept(self) -> Tensor | None:
        return self.values.min() if self.values.numel() else None


class DictionaryTrainer:
    """Trains one sae-lens dictionary in place. Call :meth:`step` per batch, or :func:`train_dictionary`."""

    def __init__(self, sae, cfg: TrainConfig):
        self.sae, self.cfg = sae, cfg
        has_threshold = getattr(sae, "threshold", None) is not None
        self.batch_topk = has_threshold and sae.cfg.metadata.get("batch_topk_k") is not None
        self.jumprelu = has_threshold and not self.batch_topk  # trained directly, with the L0 penalty
        if self.jumprelu and cfg.l0_coefficient is None:
            raise ValueError("this JumpReLU dictionary has no BatchTopK target (metadata batch_topk_k): either build it "
                             "from a DictionarySpec with activation='jumprelu' and k set (the mean L0 to train for), or "
                             "train it directly with TrainConfig(l0_coefficient=...)")
        if cfg.l0_coefficient is not None and not self.jumprelu:
            raise ValueError("l0_coefficient trains a JumpReLU dictionary without a BatchTopK target; this one is "
                             f"{'BatchTopK' if self.batch_topk else 'not JumpReLU'}: leave l0_coefficient None")
        self.topk = getattr(sae.cfg, "k", None) is not None or self.batch_topk  # AuxK, sparse codes
        self.unit_decoder = self.topk or self.jumprelu
        if cfg.matryoshka is not None and (not self.topk or cfg.matryoshka[-1] >= sae.cfg.d_sae):
            raise ValueError(f"matryoshka prefixes {cfg.matryoshka} need a TopK or BatchTopK dictionary and sizes below "
                             f"its d_sae ({sae.cfg.d_sae})")
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        self.skip = getattr(sae, "W_skip", None) is not None  # a skip transcoder: W_skip trains with the rest
        if self.skip:
            self.params.append(sae.W_skip)
        if self.jumprelu:
            # theta = exp(log_theta) stays positive; sae.threshold is rewritten from it after every step
            with torch.no_grad():
                if not (sae.threshold > 0).any():  # a fresh dictionary (built with zero thresholds)
                    sae.threshold.fill_(cfg.jumprelu_init_threshold)
            self.log_threshold = sae.threshold.detach().clamp_min(1e-12).log().clone()
            self.params.append(self.log_threshold)
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999))
        self.step_count = 0
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_enc.device)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)

    # --- schedule -----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, (step + 1) / max(1, c.warmup_steps))
        decay_start = c.steps * (1 - c.decay_fraction)
        decay = 1.0 if step < decay_start else max(0.0, (c.steps - step) / max(1.0, c.steps - decay_start))
        return c.lr * warm * decay

    # --- one step -----------------------------------------------------------------------------------
    def loss(self, x_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor, "Codes | Tensor", Tensor]:
        """(loss, normalised MSE, the code, the reconstruction). The code is ``Codes`` for TopK and BatchTopK,
        the dense activations for ReLU."""
        sae = self.sae
        pre = pre_activation(sae, x_in)
        if self.topk:
            codes = self._batch_topk_codes(pre) if self.batch_topk else self._topk_codes(pre)
            recon = codes.decode(sae.W_dec, sae.b_dec)
        elif self.jumprelu:
            codes = _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
            recon = codes @ sae.W_dec + sae.b_dec
        else:
            codes = activate(sae, pre)
            recon = decode(sae, codes)
        if self.skip:
            recon = recon + x_in @ sae.W_skip.T
        denom = (x_out - x_out.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        residual = x_out - recon
        mse = residual.pow(2).sum(-1).mean() / denom
        if self.topk:
            aux = self._aux_loss(pre, residual.detach(), denom)
            recon_loss = mse
            if self.cfg.matryoshka:
                nested = [(x_out - codes.prefix(m).decode(sae.W_dec, sae.b_dec)).pow(2).sum(-1).mean() / denom
                          for m in self.cfg.matryoshka]
                recon_loss = (mse + sum(nested)) / (len(nested) + 1)
            loss = recon_loss + self.cfg.aux_coefficient * aux
        elif self.jumprelu:
            l0 = _Step.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).sum(-1).mean()
            loss = mse + self.cfg.l0_coefficient * l0
        else:
            l1 = (codes * sae.W_dec.norm(dim=-1)).sum(-1).mean()
            loss = mse + self.cfg.l1_coefficient * l1
        return loss, mse, codes, recon

    def _topk_codes(self, pre: Tensor) -> Codes:
        vals, idx = pre.topk(int(self.sae.cfg.k), dim=-1)
        return Codes.from_slots(vals.relu() if getattr(self.sae.cfg, "topk_relu", True) else vals, idx)

    def _batch_topk_codes(self, pre: Tensor) -> Codes:
        """The ``k * batch`` largest ``relu(pre)`` of the whole batch, as ``Codes``, without sorting the batch.

        1. Candidates: each row's top ``4k``; ``t`` is the ``k * batch``-th largest candidate.
        2. A row whose smallest candidate is positive and ``>= t`` may hold more values ``>= t`` than it showed:
           its candidates double (that row only, up to ``d_sae``) and ``t`` is recomputed, until no row does.
        3. Then every value ``>= t`` of the batch is a candidate, so ``t`` is the batch's own ``k * batch``-th
           value: the kept set (candidates ``>= t``, positive) is exactly the flat top-k's.
        """
        n_rows, d_sae = pre.shape
        k = int(self.sae.cfg.metadata["batch_topk_k"])
        total = min(k * n_rows, n_rows * d_sae)
        width = min(d_sae, 4 * k)
        vals, idx = pre.topk(width, dim=-1)
        groups = [(torch.arange(n_rows, device=pre.device), vals.relu(), idx)]  # (rows, values, latents)
        while True:
            cand = torch.cat([v.detach().flatten() for _, v, _ in groups])
            t = cand.kthvalue(cand.numel() - total + 1).values
            grown = []
            for rows, v, i in groups:
                last = v.detach()[:, -1]
                full = (last >= t) & (last > 0) if v.shape[1] < d_sae else torch.zeros_like(last, dtype=torch.bool)
                if not full.any():
                    grown.append((rows, v, i))
                    continue
                grown.append((rows[~full], v[~full], i[~full]))
                wider_v, wider_i = pre[rows[full]].topk(min(d_sae, 2 * v.shape[1]), dim=-1)
                grown.append((rows[full], wider_v.relu(), wider_i))
            if len(grown) == len(groups):
                break
            groups = grown
        rows, values, latents = [], [], []
        for r, v, i in groups:
            keep = (v >= t) & (v > 0)
            rows.append(r[:, None].expand_as(v)[keep])
            values.append(v[keep])
            latents.append(i[keep])
        rows_all = torch.cat(rows)
        order = torch.argsort(rows_all, stable=True)
        return Codes(torch.cat(values)[order], torch.cat(latents)[order], rows_all[order], n_rows)

    def _batch_topk(self, pre: Tensor) -> Tensor:
        """The BatchTopK activations as a dense ``[batch, d_sae]`` tensor."""
        return self._batch_topk_codes(pre).dense(pre.shape[-1])

    @torch.no_grad()
    def _update_threshold(self, codes: Codes) -> None:
        smallest = codes.smallest_kept()
        if smallest is None:
            return
        th = self.sae.threshold
        rate = 1.0 if self.step_count == 0 else self.cfg.threshold_rate
        th.mul_(1 - rate).add_(rate * smallest)

    def _aux_loss(self, pre: Tensor, residual: Tensor, denom: Tensor) -> Tensor:
        dead = torch.nonzero(self.since_fired >= self.cfg.dead_after_tokens).flatten()
        if len(dead) == 0:
            return pre.new_zeros(())
        k_aux = min(self.cfg.aux_k or max(1, self.sae.cfg.d_in // 2), len(dead))
        vals, idx = pre.index_select(-1, dead).topk(k_aux, dim=-1)
        aux_recon = Codes.from_slots(vals.relu(), dead[idx]).decode(self.sae.W_dec)  # no bias: it explains the residual
        return (residual - aux_recon).pow(2).sum(-1).mean() / denom

    def step(self, batch) -> StepStats:
        x_in, x_out = _as_pair(batch)
        dev, dtype = self.sae.W_enc.device, self.sae.W_enc.dtype
        x_in, x_out = x_in.to(dev, dtype), x_out.to(dev, dtype)
        if not (torch.isfinite(x_in).all() and torch.isfinite(x_out).all()):
            raise ValueError(f"training batch {self.step_count} holds NaN or infinite activations; check the data source")
        if self.step_count == 0 and self.cfg.init_b_dec_from_data:
            with torch.no_grad():
                # Start as if the input were centred: b_dec at the output mean, b_enc cancelling the input mean.
                self.sae.b_dec.copy_(x_out.mean(0))
                self.sae.b_enc.copy_(-(x_in.mean(0) @ self.sae.W_enc))
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_count)
        loss, mse, codes, _ = self.loss(x_in, x_out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.unit_decoder:
            self._remove_parallel_decoder_grad()
        self.opt.step()
        if self.unit_decoder:
            with torch.no_grad():
                self.sae.W_dec /= self.sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        if self.batch_topk:
            self._update_threshold(codes)
        if self.jumprelu:
            with torch.no_grad():
                self.sae.threshold.copy_(self.log_threshold.exp())
        with torch.no_grad():
            if isinstance(codes, Codes):
                fired, l0 = codes.fired(self.sae.cfg.d_sae), codes.l0()
            else:
                fired, l0 = (codes > 0).any(0), float((codes > 0).float().sum(-1).mean())
            self.since_fired += x_in.shape[0]
            self.since_fired[fired] = 0
        self.step_count += 1
        c = self.cfg
        if c.resample_every and self.step_count % c.resample_every == 0 and self.step_count < c.resample_until * c.steps:
            self.resample_dead(x_in, x_out)
        dead = float((self.since_fired >= c.dead_after_tokens).float().mean())
        return StepStats(self.step_count, float(loss.detach()), float(mse.detach()), l0, dead)

    @torch.no_grad()
    def _remove_parallel_decoder_grad(self) -> None:
        # With unit-norm decoder rows, the radial part of the gradient only fights the renormalisation.
        # (Under no_grad: W_dec requires grad, so without it every step's correction recorded a graph that
        # the gradient kept alive, about 10 MB a step for a 4,096-feature dictionary.)
        w, g = self.sae.W_dec, self.sae.W_dec.grad
        if g is not None:
            g -= (g * w).sum(-1, keepdim=True) * w / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def resample_dead(self, x_in: Tensor, x_out: Tensor) -> int:
        """Point dead latents at badly reconstructed inputs of this batch (Anthropic, 2023). Returns how many."""
        dead = torch.nonzero(self.since_fired >= self.cfg.dead_after_tokens).flatten()
        if len(dead) == 0:
            return 0
        sae = self.sae
        recon = decode(sae, activate(sae, pre_activation(sae, x_in)))
        if self.skip:
            recon = recon + x_in @ sae.W_skip.T
        err = (x_out - recon).pow(2).sum(-1)
        probs = (err / err.sum()).cpu().double()
        if not torch.isfinite(probs).all() or probs.sum() <= 0:
            return 0
        pick = torch.multinomial(probs, len(dead), replacement=True, generator=self.generator).to(x_in.device)
        direction_out = x_out[pick] - recon[pick]
        direction_out /= direction_out.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=x_in.device)
        alive[dead] = False
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        direction_in = x_in[pick] - x_in.mean(0)
        direction_in /= direction_in.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sae.W_dec[dead] = direction_out
        # Anthropic's 0.2 keeps a revived ReLU latent small; under BatchTopK a latent that small never passes the
        # batch's threshold and dies again, so it starts at the alive latents' scale.
        sae.W_enc[:, dead] = (direction_in * enc_norm * (1.0 if self.batch_topk or self.jumprelu else 0.2)).T
        sae.b_enc[dead] = 0.0
        revived = [sae.W_enc, sae.b_enc, sae.W_dec]
        if self.jumprelu:  # a revived latent starts at the alive latents' typical threshold
            self.log_threshold[dead] = self.log_threshold[alive].median() if alive.any() else self.log_threshold[dead]
            sae.threshold.copy_(self.log_threshold.exp())
            revived.append(self.log_threshold)
        for p in revived:
            state = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    buf = state[key]
                    if p is sae.W_enc:
                        buf[:, dead] = 0.0
                    else:
                        buf[dead] = 0.0
        self.since_fired[dead] = 0
        return len(dead)

    # --- resuming -----------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        for i, p in enumerate(self.params):
            for key, buf in self.opt.state.get(p, {}).items():
                if torch.is_tensor(buf):
                    tensors[f"opt.{i}.{key}"] = buf.reshape(buf.shape) if buf.dim() else buf.reshape(1)
        tensors["since_fired"] = self.since_fired
        if self.jumprelu:
            tensors["log_threshold"] = self.log_threshold.detach()
        tensors["generator_state"] = self.generator.get_state()
        atomic_save_tensors(tensors, directory / "trainer.safetensors")
        atomic_write_json(directory / "trainer.json", {"step": self.step_count, "config": asdict(self.cfg)})

    def load_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        meta = read_json(directory / "trainer.json")
        ours = json.loads(json.dumps(asdict(self.cfg)))
        # A checkpoint from before a field existed was trained with that field's default.
        defaults = json.loads(json.dumps(asdict(TrainConfig(steps=1))))
        saved = {**{k: defaults[k] for k in ours if k != "steps"}, **meta["config"]}
        if saved != ours:
            differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise ValueError(f"{directory}: checkpoint was written with another TrainConfig (differs in {', '.join(differ)});"
                             " resume with the same settings")
        tensors = read_tensors(directory / "trainer.safetensors")
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        if self.jumprelu:
            with torch.no_grad():
                self.log_threshold.copy_(tensors["log_threshold"].to(self.log_threshold.device))
        for i, p in enumerate(self.params):
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                name = f"opt.{i}.{key}"
                if name in tensors:
                    t = tensors[name]
                    state[key] = t.reshape(()) if key == "step" else t.to(p.device)
            if state:
                self.opt.state[p] = state
        self.since_fired = tensors["since_fired"].to(self.since_fired.device)
        self.generator.set_state(tensors["generator_state"])
        self.step_count = int(meta["step"])


def train_dictionary(
    sae,
    batches: Iterable,
    cfg: TrainConfig,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    log_every: int = 50,
) -> TrainResult:
    """Train ``sae`` in place on ``cfg.steps`` batches from ``batches``; resume from ``checkpoint_dir`` if it holds one.

    When resuming, the batches already consumed are skipped from the iterator, so a seeded iterator gives
    the same run as an uninterrupted one.
    """
    from tqdm.auto import tqdm

    trainer = DictionaryTrainer(sae, cfg)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "trainer.json").is_file():
        trainer.load_checkpoint(checkpoint_dir)
        log.info("resumed from %s at step %d", checkpoint_dir, trainer.step_count)
    result = TrainResult()
    it: Iterator = iter(batches)
    for _ in range(trainer.step_count):
        next(it)
    bar = tqdm(total=cfg.steps, initial=trainer.step_count, disable=not progress, desc="train dictionary")
    while trainer.step_count < cfg.steps:
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"the batch iterator ran out after {trainer.step_count} of {cfg.steps} steps") from None
        stats = trainer.step(batch)
        if stats.step % log_every == 0 or stats.step == cfg.steps:
            result.history.append(stats)
            bar.set_postfix(loss=f"{stats.loss:.4f}", l0=f"{stats.l0:.1f}", dead=f"{stats.dead_fraction:.2f}")
        if checkpoint_dir is not None and (stats.step % checkpoint_every == 0 or stats.step == cfg.steps):
            trainer.save_checkpoint(checkpoint_dir)
        bar.update(1)
    bar.close()
    for p in trainer.params:
        p.requires_grad_(False)
    return result
