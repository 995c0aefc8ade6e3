"""MNIST for the superposition experiments: the standard IDX files offline, or ``datasets`` (``ylecun/mnist``) online.

1. ``read_idx`` parses LeCun's IDX format (optionally gzip): two zero bytes, a type code, the number of
   dimensions, each dimension as a big-endian uint32, then the data.
2. ``load_mnist(folder)`` uses the standard train/test split when the folder holds the training images; when it
   holds only the 10,000 test images (as on the project's offline machines) it splits *them* 8,000 / 2,000 by a
   fixed seed and says so in ``MnistData.source``.
3. ``load_mnist(None)`` loads the full dataset through ``datasets`` (needs the Hugging Face hub).
Images come back as float32 in [0, 1], flattened to 784; labels as int64.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
HF_DATASET = "ylecun/mnist"


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (``.gz`` or raw) as a numpy array of its declared shape and type.

    A file that is not gzip where its name says so, is cut short, or whose header does not match its size is
    refused with a ``ValueError`` naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-short gzip an EOFError
        raise ValueError(f"{path} is not a valid IDX file: it cannot be read as {'gzip' if path.suffix == '.gz' else 'a file'} "
                         f"({e}); re-download it") from None
    bad = f"{path} is not a valid IDX file"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{bad}: bad magic number {data[:4].hex()}, expected 0000 08 0N; re-download it")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{bad}: its header is cut short ({len(data)} bytes for {ndim} dimensions); re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{bad}: its header declares shape {shape} ({expected} bytes) but it holds "
                         f"{len(data) - header} bytes; re-download it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


@dataclass
class MnistData:
    train_images: torch.Tensor  # [n_train, 784] float32 in [0, 1]
    train_labels: torch.Tensor  # [n_train] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: dict = field(default_factory=dict)


def _as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"MNIST images must be [n, 28, 28], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels of shape {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"MNIST labels must be digits 0-9, got range {labels.min()}..{labels.max()}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(len(images), 784)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_mnist_idx(folder: Path, seed: int = 0, train_fraction: float = 0.8) -> MnistData:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--mnist-dir {folder} is not a folder")
    found = {k: _find(folder, stem) for k, stem in FILES.items()}
    if found["test_images"] is None or found["test_labels"] is None:
        raise FileNotFoundError(f"{folder} lacks {FILES['test_images']}[.gz] and {FILES['test_labels']}[.gz]")
    test_x, test_y = _as_tensors(read_idx(found["test_images"]), read_idx(found["test_labels"]))
    files = {k: str(p) for k, p in found.items() if p is not None}
    if found["train_images"] is not None and found["train_labels"] is not None:
        train_x, train_y = _as_tensors(read_idx(found["train_images"]), read_idx(found["train_labels"]))
        split = "standard: the 60,000 training images to train, the 10,000 test images to evaluate"
        used = {k: files[k] for k in FILES}
    else:
        # Only the test set exists: split it by a fixed seed. Results are then on 8,000 training images.
        perm = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))
        n_train = int(round(train_fraction * len(test_x)))
        train_idx, test_idx = perm[:n_train], perm[n_train:]
        train_x, train_y = test_x[train_idx], test_y[train_idx]
        test_x, test_y = test_x[test_idx], test_y[test_idx]
        split = (f"only the {len(perm)} MNIST test images exist here (no training images): split by seed {seed} into "
                 f"{len(train_x)} to train and {len(test_x)} to evaluate; not comparable to numbers on the 60,000/10,000 split")
        used = {k: files[k] for k in ("test_images", "test_labels")}
        log.warning("MNIST: %s", split)
    source = {"source": "idx", "folder": str(folder), "files_used": used, "split": split, "seed": seed,
              "n_train": len(train_x), "n_test": len(test_x)}
    return MnistData(train_x, train_y, test_x, test_y, source)


def load_mnist_hub() -> MnistData:
    """The full dataset through ``datasets``; needs the Hugging Face hub (not reachable on offline machines)."""
    from datasets import load_dataset

    ds = load_dataset(HF_DATASET)
    parts = {}
    for split in ("train", "test"):
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds[split]["image"]])
        parts[split] = _as_tensors(images, np.asarray(ds[split]["label"]))
    source = {"source": f"datasets:{HF_DATASET}", "split": "standard: 60,000 train / 10,000 test",
              "n_train": len(parts["train"][0]), "n_test": len(parts["test"][0])}
    return MnistData(*parts["train"], *parts["test"], source)


def load_mnist(folder: Path | None, seed: int = 0) -> MnistData:
    return load_mnist_idx(folder, seed=seed) if folder is not None else load_mnist_hub()
