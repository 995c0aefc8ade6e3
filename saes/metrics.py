"""How good a dictionary is, measured on held-out text with the dictionary in place.

For each dictionary, over the same held-out tokens:
1. **L0**: mean number of active features per token.
2. **Explained variance**: ``1 - sum |x_out - recon|^2 / sum |x_out - mean(x_out)|^2`` over all tokens.
3. **Dead fraction**: the share of features that never fire on the evaluation tokens.
4. **CE loss recovered**: the model's next-token loss with the dictionary's reconstruction spliced in at its
   output hook (``L_dict``), against the clean loss (``L_clean``) and the loss with that hook zero-ablated
   (``L_zero``): ``(L_zero - L_dict) / (L_zero - L_clean)``. 1 means the dictionary loses nothing.
   A transcoder is spliced by reading its input hook in the same forward pass and replacing its output hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import Tensor

from saes.dictionary import decode, encode, reconstruct, skip_term, spec_of


@dataclass
class DictionaryMetrics:
    name: str
    kind: str
    layer: int
    hook_in: str
    hook_out: str
    d_sae: int
    l0: float
    explained_variance: float
    dead_fraction: float
    ce_loss_recovered: float
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero_ablated: float
    n_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def _site_input(spec, cache) -> Tensor:
    x = cache[spec.hook_in]
    return x.flatten(-2) if spec.hook_in.endswith("hook_z") else x


@contextmanager
def spliced(model, sae) -> Iterator[None]:
    """Replace the dictionary's output hook by its reconstruction for the forward passes inside."""
    spec = spec_of(sae)
    stash: dict[str, Tensor] = {}

    def read_in(act, hook):
        stash["x"] = act
        return act

    def write_out(act, hook):
        x = stash.pop("x") if spec.hook_in != spec.hook_out else act
        flat = x.flatten(-2) if spec.hook_in.endswith("hook_z") else x
        return reconstruct(sae, flat).reshape(act.shape).to(act.dtype)  # with a skip transcoder's W_skip path

    hooks = [(spec.hook_out, write_out)]
    if spec.hook_in != spec.hook_out:
        hooks.insert(0, (spec.hook_in, read_in))
    with model.hooks(fwd_hooks=hooks):
        yield


@contextmanager
def zero_ablated(model, hook_name: str) -> Iterator[None]:
    with model.hooks(fwd_hooks=[(hook_name, lambda act, hook: torch.zeros_like(act))]):
        yield


@torch.no_grad()
def evaluate_dictionaries(suite, rows: Tensor, batch_size: int = 16, ce_rows: int = 128,
                          progress: bool = False) -> list[DictionaryMetrics]:
    """Metrics for every dictionary of ``suite`` on ``rows`` ([n, pos] token ids starting with BOS).

    L0, explained variance and dead fraction use every row; the CE losses use the first ``ce_rows``.
    """
    from tqdm.auto import tqdm

    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"evaluation rows must be a non-empty [n, pos] tensor, got shape {tuple(rows.shape)}")
    model = suite.model
    dev = suite.device
    dicts = suite.dictionaries()
    specs = {n: spec_of(s) for n, s in dicts.items()}
    hooks = sorted({h for s in specs.values() for h in (s.hook_in, s.hook_out)})
    sq_err = {n: 0.0 for n in dicts}
    sq_tot = {n: torch.zeros((), dtype=torch.float64) for n in dicts}
    sums = {n: None for n in dicts}
    sumsq = {n: 0.0 for n in dicts}
    l0 = {n: 0.0 for n in dicts}
    fired = {n: torch.zeros(s.cfg.d_sae, dtype=torch.bool, device=dev) for n, s in dicts.items()}
    n_tok = 0
    for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="dictionary stats"):
        batch = rows[start : start + batch_size].to(dev)
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in hooks)
        n_tok += batch.numel()
        for n, sae in dicts.items():
            spec = specs[n]
            x_in = _site_input(spec, cache).reshape(-1, spec.d_in).to(sae.W_enc.dtype)
            x_out = cache[spec.hook_out].reshape(-1, spec.d_out).to(sae.W_enc.dtype).double()
            acts = encode(sae, x_in)
            recon = decode(sae, acts).double()
            skip = skip_term(sae, x_in)
            if skip is not None:
                recon = recon + skip.double()
            sq_err[n] += float((x_out - recon).pow(2).sum())
            s = x_out.sum(0)
            sums[n] = s if sums[n] is None else sums[n] + s
            sumsq[n] += float(x_out.pow(2).sum())
            active = acts != 0  # circuit-tracer's TopK keeps negative activations
            l0[n] += float(active.sum())
            fired[n] |= active.any(0)
    ce = {n: {} for n in dicts}
    ce_batch = rows[:ce_rows]
    clean_total, counts = 0.0, 0
    per = {n: {"spliced": 0.0, "zero": 0.0} for n in dicts}
    for start in tqdm(range(0, len(ce_batch), batch_size), disable=not progress, desc="CE loss recovered"):
        batch = ce_batch[start : start + batch_size].to(dev)
        w = batch.shape[0]
        clean_total += float(model(batch, return_type="loss")) * w
        for n, sae in dicts.items():
            with spliced(model, sae):
                per[n]["spliced"] += float(model(batch, return_type="loss")) * w
            with zero_ablated(model, specs[n].hook_out):
                per[n]["zero"] += float(model(batch, return_type="loss")) * w
        counts += w
    clean = clean_total / counts
    out = []
    for n, sae in dicts.items():
        spec = specs[n]
        total_var = sumsq[n] - float(sums[n].pow(2).sum()) / n_tok
        spliced_loss, zero_loss = per[n]["spliced"] / counts, per[n]["zero"] / counts
        recovered = (zero_loss - spliced_loss) / (zero_loss - clean) if zero_loss != clean else float("nan")
        out.append(DictionaryMetrics(
            name=n, kind=spec.kind, layer=spec.layer, hook_in=spec.hook_in, hook_out=spec.hook_out, d_sae=spec.d_sae,
            l0=l0[n] / n_tok, explained_variance=1 - sq_err[n] / total_var,
            dead_fraction=float((~fired[n]).float().mean()), ce_loss_recovered=recovered,
            ce_loss_clean=clean, ce_loss_spliced=spliced_loss, ce_loss_zero_ablated=zero_loss, n_tokens=n_tok,
        ))
    return out
