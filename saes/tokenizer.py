"""A byte-level BPE tokenizer (GPT-2 style) trained with ``tokenizers``, saved for TransformerLens.

TransformerLens re-loads a tokenizer by its ``name_or_path``, so a tokenizer built in memory is first saved
with ``save_pretrained(dir)`` and then loaded back from ``dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face fast tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(directory: Path):
    """Load a tokenizer saved by :func:`train_bpe` (no network)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}; rebuild the suite with scripts/build_mini.py")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
