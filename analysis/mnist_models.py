"""The small networks of the MNIST experiments: the 784-49-10 classifier, the toy-model autoencoder on its hidden
layer (49 -> 2 -> 49), and the image decoder (49 hidden activations -> 784 pixels). All trained with Adam, seeded.

The autoencoder is the toy model of Elhage et al. 2022 applied to real features: ``z = W a`` (``W: [2, 49]``),
``a' = ReLU(W^T z + b)``. With ``feature_probability < 1`` every hidden unit is independently zeroed with
probability ``S = 1 - feature_probability`` before it goes in (and is the target), which makes the features sparse.
"""

from __future__ import annotations

import logging

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor, nn

log = logging.getLogger(__name__)


class MnistClassifier(nn.Module):
    """784 -> 49 (ReLU) -> 10."""

    def __init__(self, d_hidden: int = 49, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global generator; seed it locally
            torch.manual_seed(seed)
            self.fc1 = nn.Linear(784, d_hidden)
            self.fc2 = nn.Linear(d_hidden, 10)

    def hidden(self, images: Float[Tensor, "batch 784"]) -> Float[Tensor, "batch hidden"]:
        return torch.relu(self.fc1(images))

    def logits_from_hidden(self, hidden: Float[Tensor, "batch hidden"]) -> Float[Tensor, "batch 10"]:
        return self.fc2(hidden)

    def forward(self, images: Float[Tensor, "batch 784"]) -> Float[Tensor, "batch 10"]:
        return self.logits_from_hidden(self.hidden(images))


def _minibatches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return perm.split(batch_size)


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 15, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, progress: bool = True) -> MnistClassifier:
    from tqdm.auto import tqdm

    model = MnistClassifier(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(epochs), disable=not progress, desc="mnist classifier (epochs)"):
        for idx in _minibatches(len(images), batch_size, gen):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


class HiddenAutoencoder(nn.Module):
    """The toy ReLU output model on the classifier's hidden units: ``a' = ReLU(W^T W a + b)``, ``W: [m, n]``."""

    def __init__(self, n_features: int = 49, n_hidden: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(n_hidden, n_features, generator=gen) * (2.0 / (n_hidden + n_features)) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_features))

    def forward(self, a: Float[Tensor, "batch feature"]) -> Float[Tensor, "batch feature"]:
        return self.forward_with(self.W, a)

    def forward_with(self, W: Float[Tensor, "... hidden feature"], a: Float[Tensor, "batch feature"]) -> Tensor:
        """The model with another ``W`` (a leading axis gives many variants at once, as the ablations need)."""
        z = einsum(a, W, "batch feat, ... hid feat -> ... batch hid")
        return torch.relu(einsum(z, W, "... batch hid, ... hid feat -> ... batch feat") + self.b)


def sparsify(a: Tensor, feature_probability: float, gen: torch.Generator) -> Tensor:
    """Keep each entry with probability ``feature_probability``, else 0 (the toy model's sparsity S = 1 - p)."""
    if feature_probability >= 1:
        return a
    return a * (torch.rand(a.shape, generator=gen) < feature_probability)


@torch.no_grad()
def loss_shares(ae: HiddenAutoencoder, a: Tensor, importance: Tensor | None = None) -> Tensor:
    """Each feature's share of the reconstruction: how much the (importance-weighted) loss rises when its column
    of W is removed (from both the encoding and the read-out), normalised to sum to 1 over features. 0 for an
    unused feature."""
    imp = torch.ones(a.shape[1]) if importance is None else importance
    base = (imp * (ae(a) - a).pow(2)).mean()
    n = ae.W.shape[1]
    ablated = ae.W.unsqueeze(0).repeat(n, 1, 1)
    ablated[torch.arange(n), :, torch.arange(n)] = 0.0
    losses = (imp * (ae.forward_with(ablated, a) - a).pow(2)).mean(dim=(1, 2))
    rise = (losses - base).clamp_min(0)
    return rise / rise.sum().clamp_min(1e-12)


def train_hidden_autoencoder(acts: Tensor, eval_acts: Tensor, feature_probability: float, epochs: int, repeats_per_epoch: int,
                             batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                             desc: str = "autoencoder", importance: Tensor | None = None) -> tuple[HiddenAutoencoder, list[dict]]:
    """Train the 49 -> 2 -> 49 model; one epoch passes over ``acts`` ``repeats_per_epoch`` times (fresh sparsity
    masks each time). After each epoch, record ``W`` and the loss shares on ``eval_acts`` (masked the same way).
    ``importance`` weights each feature's squared error as in the toy model (default: all 1)."""
    from tqdm.auto import tqdm

    ae = HiddenAutoencoder(acts.shape[1], 2, seed=seed)
    imp = torch.ones(acts.shape[1]) if importance is None else importance
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    eval_gen = torch.Generator().manual_seed(seed + 2)
    # A fixed evaluation sample for all epochs. With sparse features it is masked many times over (about 50
    # occurrences per feature), and all-zero rows are dropped: every W reconstructs them alike (as ReLU(b)),
    # so they would not change any feature's share, only cost memory in the ablations.
    copies = 1 if feature_probability >= 1 else -(-50 // max(1, int(feature_probability * len(eval_acts))))
    eval_x = sparsify(eval_acts.repeat(copies, 1), feature_probability, eval_gen)
    eval_x = eval_x[(eval_x != 0).any(-1)]
    snapshots = []
    for epoch in tqdm(range(epochs), disable=not progress, desc=f"{desc} (epochs)"):
        for _ in range(repeats_per_epoch):
            for idx in _minibatches(len(acts), batch_size, gen):
                x = sparsify(acts[idx], feature_probability, gen)
                loss = (imp * (ae(x) - x).pow(2)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            eval_loss = float((imp * (ae(eval_x) - eval_x).pow(2)).mean())
        snapshots.append({"epoch": epoch + 1, "W": ae.W.detach().clone(), "loss_shares": loss_shares(ae, eval_x, imp),
                          "eval_loss": eval_loss})
    ae.requires_grad_(False)
    return ae, snapshots


class ImageDecoder(nn.Module):
    """49 hidden activations -> 784 pixels in [0, 1]."""

    def __init__(self, d_hidden: int = 49, width: int = 256, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(d_hidden, width), nn.ReLU(), nn.Linear(width, 784), nn.Sigmoid())

    def forward(self, hidden: Float[Tensor, "batch hidden"]) -> Float[Tensor, "batch 784"]:
        return self.net(hidden)


def train_image_decoder(hidden: Tensor, images: Tensor, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                        seed: int = 0, progress: bool = True) -> ImageDecoder:
    from tqdm.auto import tqdm

    dec = ImageDecoder(hidden.shape[1], seed=seed)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(epochs), disable=not progress, desc="image decoder (epochs)"):
        for idx in _minibatches(len(hidden), batch_size, gen):
            loss = (dec(hidden[idx]) - images[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    dec.requires_grad_(False)
    return dec
