"""Timestamped progress lines for logs: ``[HH:MM:SS +elapsed s] what``, flushed at once, so a
process killed on the way still says how far it got. Standard library only."""

from __future__ import annotations

import datetime as dt
import sys
import time

T0 = time.monotonic()  # when this module was first imported (gpu-check: at its start)


def stamp(what: str) -> str:
    """``[HH:MM:SS +elapsed s] what``: wall time and time since ``T0``."""
    return f"[{dt.datetime.now():%H:%M:%S} +{time.monotonic() - T0:.1f} s] {what}"


def phase(what: str, file=None) -> None:
    """Print a stamped line (stdout by default) and flush it."""
    print(stamp(what), file=file or sys.stdout, flush=True)
