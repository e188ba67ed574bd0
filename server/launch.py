"""``engram-serve``'s entry point: SIGINT and SIGTERM are caught from the first instant, before
torch and the web stack are imported (a second or two), then the CLI runs.

The first signal asks for a graceful shutdown: before the server starts, a clean exit (status
0); while the model loads, loading stops at its next phase boundary; once serving, a drain (see
``ServerState.drain``). A second signal exits at once with status 1.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalLatch:
    """Counts SIGINT/SIGTERM. Runs inside the signal handler: no locks, no logging."""

    def __init__(self) -> None:
        self.count = 0
        self.first: int | None = None

    def __call__(self, sig: int, frame=None) -> None:
        self.count += 1
        if self.count == 1:
            self.first = sig
            return
        os.write(2, b"engram-serve: second signal: exiting now, without draining\n")
        os._exit(1)

    @property
    def name(self) -> str:
        return signal.Signals(self.first).name if self.first else ""

    def install(self) -> SignalLatch:
        for s in SIGNALS:
            signal.signal(s, self)
        return self


def main(argv: list[str] | None = None) -> int:
    latch = SignalLatch().install()
    from .cli import main as run  # the heavy imports, under the latch

    return run(argv, latch)


if __name__ == "__main__":
    sys.exit(main())
