"""Hugging Face ``tokenizers`` tokenizer plus the Engram compression table.

Compression maps tokens that differ only by case, accents, Unicode form or surrounding
whitespace to one id (the reference rule), shrinking the space the N-gram hash mixes over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

from .hf_files import TokenizerFiles

_SENTINEL = "\ue000"


def compression_normalizer() -> normalizers.Normalizer:
    """NFKC, NFD, strip accents, lowercase, collapse whitespace, strip; a lone space stays."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def build_compression_lookup(tokenizer: Tokenizer) -> np.ndarray:
    """Raw id -> compressed id, new ids assigned in first-seen order of normalized keys.

    A token whose decoded text holds U+FFFD (a partial UTF-8 byte sequence) keys on its raw
    token string, so distinct byte pieces stay distinct.
    """
    norm = compression_normalizer()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    key_to_new: dict[str, int] = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for tid in range(vocab_size):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.id_to_token(tid)
        else:
            key = norm.normalize_str(text) or text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup


def compress_ids(lookup: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
    """Vectorised raw -> compressed lookup; negative ids pass through; None means identity."""
    arr = np.asarray(ids, dtype=np.int64)
    if lookup is None:
        return arr
    out = arr.copy()
    pos = arr >= 0
    out[pos] = lookup[arr[pos]]
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def byte_table(tok: EngramTokenizer) -> list[bytes] | None:
    """Per-id bytes of a byte-level tokenizer, each checked against the tokenizer's own decode
    of that id; None when the decoder is not plain byte-level or any id disagrees."""
    if type(tok.tokenizer.decoder).__name__ != "ByteLevel":
        return None
    inv = _byte_decoder()
    table = []
    for tid in range(tok.vocab_size):
        native = tok.tokenizer.decode([tid], skip_special_tokens=False)
        if tid in tok.added_tokens:
            if native != tok.added_tokens[tid]:  # the two special-token modes would differ
                return None
            table.append(native.encode())
            continue
        piece = tok.id_to_token(tid)
        if piece is None or any(c not in inv for c in piece):
            return None
        raw = bytes(inv[c] for c in piece)
        if raw.decode("utf-8", "replace") != native:
            return None
        table.append(raw)
    return table


class EngramTokenizer:
    """Text <-> ids, and raw ids -> compressed ids for hashing."""

    def __init__(self, tokenizer: Tokenizer, lookup: np.ndarray | None = None) -> None:
        self.tokenizer = tokenizer
        self._lookup = lookup
        self.files = TokenizerFiles()  # tokenizer_config.json's special tokens, chat template
        added = tokenizer.get_added_tokens_decoder()
        self.added_tokens = {i: t.content for i, t in added.items()}  # id -> content
        self.special_tokens = {i: t.content for i, t in added.items() if t.special}
        self._token_bytes: list[bytes] | None | bool = False  # False: not yet worked out
        self._token_texts: list[str | None] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> EngramTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = cls(Tokenizer.from_file(str(path)))
        tok.files = TokenizerFiles.read(path.parent)
        return tok

    @property
    def lookup(self) -> np.ndarray:
        """Raw id -> compressed id; built on first use (a model without Engram layers never
        needs it, and it decodes every token of a large vocabulary)."""
        if self._lookup is None:
            self._lookup = build_compression_lookup(self.tokenizer)
        return self._lookup

    @lookup.setter
    def lookup(self, table: np.ndarray) -> None:
        self._lookup = table

    @property
    def compressed_vocab_size(self) -> int:
        return int(self.lookup.max()) + 1

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids; add_special_tokens applies the tokenizer's post-processor (BOS etc.)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self,
        ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Ids -> text. With spaces_between_special_tokens=False, added tokens are joined to
        their neighbours as-is instead of whatever separator the decoder puts between them."""
        ids = list(ids)
        if skip_special_tokens or spaces_between_special_tokens:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        added = self.added_tokens
        parts, run = [], []
        for tid in ids:
            if tid in added:
                if run:
                    parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(added[tid])
            else:
                run.append(tid)
        if run:
            parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
        return "".join(parts)

    def token_bytes(self) -> list[bytes] | None:
        """Each id's bytes, when decoding is just concatenating them and reading the result
        as UTF-8 (a byte-level BPE decoder: GPT-2, Llama 3, Qwen); None otherwise. Lets the
        detokenizer decode one new token's bytes instead of re-decoding a window of ids."""
        if self._token_bytes is False:
            self._token_bytes = byte_table(self)
        return self._token_bytes

    def token_texts(self) -> list[str | None] | None:
        """Each id's text when its bytes are whole UTF-8 characters on their own (None for
        added tokens, pieces of a character, and a text ending in U+FFFD, which a stream holds
        back); None when the tokenizer is not byte-level. The detokenizer's one-lookup path."""
        if self._token_texts is None and (table := self.token_bytes()) is not None:
            texts: list[str | None] = []
            for tid, raw in enumerate(table):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                if not text or text.endswith("\ufffd") or tid in self.added_tokens:
                    text = None
                texts.append(text)
            self._token_texts = texts
        return self._token_texts

    def to_json(self) -> str:
        """The tokenizer.json content: what ``tokenizers.Tokenizer.from_str`` rebuilds it from."""
        return self.tokenizer.to_str()

    def id_to_token(self, tid: int) -> str | None:
        return self.tokenizer.id_to_token(tid)

    def compress(self, ids: np.ndarray) -> np.ndarray:
        return compress_ids(self.lookup, ids)
