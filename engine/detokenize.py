"""Incremental detokenization with stop strings matched across token boundaries.

Text is re-decoded from the sequence's output ids (so multi-byte characters split across
tokens come out whole); what may still become the start of a stop string, or an incomplete
UTF-8 character, is held back until it is settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.tokenizer import EngramTokenizer


@dataclass
class Detokenizer:
    tokenizer: EngramTokenizer
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already handed out
    stopped: bool = False
    text: str = ""

    def __post_init__(self) -> None:
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_id: int) -> str:
        """Append a token; return the newly settled text (possibly empty)."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if self.stop:
            start = max(0, self.emitted - self.hold)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = full[: min(hits)]
                return self._take(len(self.text))
        self.text = full
        settled = len(full) - self.hold
        if full.endswith("\ufffd"):  # a character still waiting for its remaining bytes
            settled = min(settled, len(full) - 1)
        return self._take(settled)

    def flush(self) -> str:
        """The sequence ended: hand out everything that is left."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
