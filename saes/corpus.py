"""The mini suite's corpus: the standard library source of the running interpreter.

1. List every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``, caches
   and test packages (tests are mostly repetitive fixtures; the rest is code with English docstrings).
2. Split by a fixed rule that every machine computes the same way: a file is held out when
   ``crc32(relative path) % HELDOUT_MODULUS == 0`` (about 1 file in 20).
3. Tokenise each file, join files with the end-of-text token, and cut the stream into rows of ``n_ctx``
   tokens, each starting with that token as BOS (as TransformerLens's ``to_tokens`` does).

The corpus differs between Python versions; the shipped suite was built on the version recorded in its
``cfg.json`` (``corpus_python``).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

import torch

HELDOUT_MODULUS = 20
SKIP_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every source file of the corpus, sorted by relative path (deterministic)."""
    root = stdlib_root() if root is None else Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative_path: str) -> bool:
    """The fixed held-out rule: about one file in ``HELDOUT_MODULUS``, the same on every machine."""
    return zlib.crc32(relative_path.encode("utf-8")) % HELDOUT_MODULUS == 0


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) under the fixed rule."""
    root = stdlib_root() if root is None else Path(root)
    train, heldout = [], []
    for path in stdlib_files(root):
        (heldout if is_heldout(path.relative_to(root).as_posix()) else train).append(path)
    return train, heldout


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def token_stream(tokenizer, files: list[Path], eot_id: int) -> torch.Tensor:
    """All files tokenised and joined by the end-of-text token, as one int64 tensor."""
    ids: list[int] = []
    texts = [read_text(p) for p in files]
    for enc in tokenizer.encode_batch(texts):
        ids.append(eot_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def rows_from_stream(stream: torch.Tensor, n_ctx: int, bos_id: int) -> torch.Tensor:
    """Cut a token stream into ``[n_rows, n_ctx]`` rows, each starting with BOS."""
    body = n_ctx - 1
    n_rows = len(stream) // body
    if n_rows == 0:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one row of {n_ctx}")
    rows = stream[: n_rows * body].view(n_rows, body)
    bos = torch.full((n_rows, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


def iterate_batches(rows: torch.Tensor, batch_size: int, seed: int, epochs: int | None = None) -> Iterator[torch.Tensor]:
    """Shuffled batches of rows, epoch after epoch, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(rows), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]
        epoch += 1
