"""Training the mini suite's language model: a small GPT-2-architecture HookedTransformer.

1. Build a ``HookedTransformerConfig`` with GPT-2's architecture (learned positions, LayerNorm, GELU).
2. Train next-token prediction with AdamW (cosine schedule after a warm-up) on rows of tokens that begin
   with BOS, checkpointing so a killed run resumes.
3. Apply the same weight processing as ``HookedTransformer.from_pretrained("gpt2")``: fold LayerNorm
   weights into the next layer, centre the residual-writing weights and the unembedding, fold the value
   biases into ``b_O``. Dictionaries are then trained on this processed model, as GPT-2 small's were.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from saes.io import atomic_save_tensors, atomic_write_json, read_json, read_tensors

log = logging.getLogger(__name__)

# The processing of HookedTransformer.from_pretrained's defaults, applied to GPT-2 small and to mini alike.
# (``process_weights_`` folds the value biases into ``b_O`` as ``from_pretrained`` does: TransformerLens's
# ``load_and_process_state_dict`` defaults to ``fold_value_biases=True``.)
PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True)


@dataclass(frozen=True)
class LMConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    d_vocab: int = 4096
    n_ctx: int = 256
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(f"n_heads * d_head must equal d_model ({self.n_heads}*{self.d_head} != {self.d_model})")
        if min(self.n_layers, self.d_model, self.d_vocab, self.n_ctx, self.steps, self.batch_size) <= 0:
            raise ValueError("all sizes must be positive")

    def hooked_config(self, model_name: str = "mini"):
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_head,
            d_mlp=self.d_mlp, d_vocab=self.d_vocab, n_ctx=self.n_ctx, act_fn="gelu_new",
            normalization_type="LN", positional_embedding_type="standard", model_name=model_name,
            original_architecture="GPT2LMHeadModel", default_prepend_bos=True, seed=self.seed,
        )


def lm_lr(cfg: LMConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def next_token_loss(model, tokens: Tensor) -> Tensor:
    return model(tokens, return_type="loss")


def train_language_model(model, rows: Tensor, cfg: LMConfig, checkpoint_dir: Path | None = None, progress: bool = True,
                         checkpoint_every: int = 250, stop_after: int | None = None) -> list[dict]:
    """Train ``model`` in place on ``rows`` ([n, n_ctx] tokens); resumable from ``checkpoint_dir``.

    ``stop_after`` ends training early at that step while keeping ``cfg.steps``'s learning-rate schedule.
    """
    from tqdm.auto import tqdm

    from saes.corpus import iterate_batches

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    start = 0
    names = [n for n, _ in model.named_parameters()]
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "lm_trainer.json").is_file():
        meta = read_json(Path(checkpoint_dir) / "lm_trainer.json")
        if meta["config"] != asdict(cfg):
            raise ValueError(f"{checkpoint_dir}: checkpoint was written with another LMConfig")
        t = read_tensors(Path(checkpoint_dir) / "lm_trainer.safetensors")
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=False)
        params = dict(model.named_parameters())
        for n in names:
            if f"opt.{n}.exp_avg" in t:
                opt.state[params[n]] = {"step": t[f"opt.{n}.step"].reshape(()), "exp_avg": t[f"opt.{n}.exp_avg"],
                                        "exp_avg_sq": t[f"opt.{n}.exp_avg_sq"]}
        start = int(meta["step"])
        log.info("resumed language-model training at step %d", start)
    batches = iterate_batches(rows, cfg.batch_size, seed=cfg.seed)
    for _ in range(start):
        next(batches)
    history: list[dict] = []
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=end, initial=min(start, end), disable=not progress, desc="train mini LM")
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lm_lr(cfg, step)
        loss = next_token_loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            history.append({"step": step + 1, "loss": float(loss)})
            bar.set_postfix(loss=f"{float(loss):.3f}")
        bar.update(1)
        if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
            params = dict(model.named_parameters())
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            for n in names:
                st = opt.state.get(params[n], {})
                if "exp_avg" in st:
                    tensors[f"opt.{n}.exp_avg"] = st["exp_avg"]
                    tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"]
                    tensors[f"opt.{n}.step"] = st["step"].reshape(1)
            atomic_save_tensors(tensors, Path(checkpoint_dir) / "lm_trainer.safetensors")
            atomic_write_json(Path(checkpoint_dir) / "lm_trainer.json", {"step": step + 1, "config": asdict(cfg)})
    bar.close()
    model.eval()
    return history


def process_weights(model) -> None:
    """Apply GPT-2's from_pretrained processing in place (see ``PROCESSING``)."""
    model.process_weights_(**PROCESSING)
    # process_weights_ swaps in new LayerNormPre modules without re-indexing hooks; without setup() the
    # names ``blocks.L.ln2.hook_normalized`` would point at the discarded modules.
    model.setup()


@torch.no_grad()
def heldout_loss(model, rows: Tensor, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        loss = model(batch, return_type="loss")
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    return total / max(1, count)
