"""The built-in model's corpus: the CPython standard library on this machine, test suites out.

Files split into train/validation by a hash of their path relative to the stdlib root, so the
split is the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOS = "<|endoftext|>"
VAL_BUCKETS = 20  # one file in 20 is held out
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        out.append(p)
    if not out:
        raise FileNotFoundError(f"no Python files under {root}")
    return out


def is_validation(path: Path, root: Path | None = None) -> bool:
    rel = path.relative_to(root or stdlib_root()).as_posix()
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % VAL_BUCKETS == 0


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    files = stdlib_files(root)
    val = [p for p in files if is_validation(p, root)]
    train = [p for p in files if not is_validation(p, root)]
    return train, val


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: Iterable[Path], vocab_size: int = 8192) -> Tokenizer:
    """Byte-level BPE over the training files; ``<|endoftext|>`` is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer)
    return tok


def encode_files(
    tok: Tokenizer, files: list[Path], desc: str = "encoding", progress: bool = True
) -> np.ndarray:
    """All files as one id stream, each followed by EOS."""
    eos = tok.token_to_id(EOS)
    parts = []
    for p in tqdm(files, desc=desc, unit="file", leave=False, disable=not progress):
        parts.append(np.array(tok.encode(read_text(p)).ids + [eos], dtype=np.int32))
    return np.concatenate(parts)
