"""Incremental detokenization with stop strings matched across token boundaries.

With a byte-level tokenizer (``EngramTokenizer.token_bytes``) each token adds its own bytes
to an incremental UTF-8 decoder: one table lookup per token, and the bytes of a character
split across tokens wait in the decoder until it is whole. Otherwise each token re-decodes
only a short window of ids, from the last point where the text was complete (two decodes per
token). Either way a long generation costs the same per token as a short one. What may still
become the start of a stop string, or an incomplete UTF-8 character, is held back until it is
settled. Before ``min_tokens``
tokens are out, stop strings do not end the sequence; later, only a match that ends in text
produced from then on counts (as vLLM checks).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from models.tokenizer import EngramTokenizer


@dataclass(slots=True)
class Detokenizer:
    tokenizer: EngramTokenizer
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_tokens: int = 0
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already handed out (but on the plain path)
    stopped: bool = False
    text: str = ""
    floor: int = 0  # a stop string must end past this many characters (min_tokens)
    complete: str = ""  # the text of ids[:read], which ended on a whole character
    prefix: int = 0  # ids[prefix:read] decode to the tail of ``complete`` (the window's start)
    read: int = 0
    byte_level: bool = True  # False: always the window path (tests compare the two)
    # set up by __post_init__ (slots: each step reads them for every sequence)
    hold: int = field(init=False, default=0)
    _bytes: list[bytes] | None = field(init=False, default=None)
    _skip: set[int] = field(init=False, default_factory=set)
    _utf8: codecs.IncrementalDecoder | None = field(init=False, default=None)
    _partial: bool = field(init=False, default=False)
    _plain: bool = field(init=False, default=False)
    _texts: list[str | None] | None = field(init=False, default=None)
    _pieces: list[str] = field(init=False, default_factory=list)
    _held: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self._bytes = self.tokenizer.token_bytes() if self.byte_level else None
        self._skip = set(self.tokenizer.special_tokens) if self.skip_special_tokens else set()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = False
        # byte-level without stop strings: nothing is held back but an unfinished character
        self._plain = self._bytes is not None and not self.stop
        # the plain path keeps its pieces (``text`` is whole after flush) and what it holds
        # back: a last U+FFFD that may yet be followed by more bytes of a broken character
        self._texts = self.tokenizer.token_texts() if self._plain else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, self.skip_special_tokens, self.spaces_between_special_tokens
        )

    def add(self, token_id: int) -> str:
        """Append a token; return the newly settled text (possibly empty)."""
        if self._plain:
            return self._add_plain(token_id)
        self.ids.append(token_id)
        if self._bytes is not None:
            piece = b"" if token_id in self._skip else self._bytes[token_id]
            if piece:
                self.complete += self._utf8.decode(piece)
                # an ASCII last byte leaves nothing waiting in the decoder
                self._partial = piece[-1] >= 0x80 and bool(self._utf8.getstate()[0])
            full = self.complete
            if self._partial:  # a character waits for its remaining bytes
                full += "\ufffd"  # as a whole decode shows it
        else:
            full = self._window(token_id)
        if len(self.ids) < self.min_tokens:
            self.floor = len(full)
        elif self.stop:
            start = max(0, self.emitted - self.hold)
            found = (full.find(s, max(start, self.floor - len(s) + 1)) for s in self.stop)
            hits = [i for i in found if i >= 0]
            if hits:
                self.stopped = True
                self.text = full[: min(hits)]
                return self._take(len(self.text))
        self.text = full
        settled = len(full) - self.hold
        if full.endswith("\ufffd"):  # a character still waiting for its remaining bytes
            settled = min(settled, len(full) - 1)
        return self._take(settled)

    def _add_plain(self, token_id: int) -> str:
        """:meth:`add` when nothing can stop the text (the same deltas, fewer steps): a token
        that is whole characters on its own, with nothing waiting before it, is one lookup
        (``ids`` is not kept: nothing on this path reads it). ``Engine.append_all`` inlines
        that first case: keep the two alike."""
        if not self._partial and not self._held:
            text = self._texts[token_id]
            if text is not None:
                self._pieces.append(text)
                return text
        piece = b"" if token_id in self._skip else self._bytes[token_id]
        if not piece:
            return ""
        new = self._utf8.decode(piece)
        if new:
            self._pieces.append(new)
        self._partial = piece[-1] >= 0x80 and bool(self._utf8.getstate()[0])
        pending = self._held + new  # settled text not handed out yet
        if self._partial or not pending.endswith("\ufffd"):
            self._held = ""
            return pending
        self._held = "\ufffd"  # it may still be (part of) a character waiting for its bytes
        return pending[:-1]

    def _window(self, token_id: int) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        full = self.complete + window[len(before) :]
        if not window.endswith("\ufffd"):  # whole characters: the window moves up
            self.complete, self.prefix, self.read = full, self.read, len(self.ids)
        return full

    def flush(self) -> str:
        """The sequence ended: hand out everything that is left."""
        if self._plain:
            tail = "\ufffd" if self._partial else ""
            self.text = "".join(self._pieces) + tail
            out = self._held + tail
            self._held, self._pieces, self._partial = "", [self.text], False
            return out
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
