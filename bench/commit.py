"""Which commit the code runs from, also in a plain copy of the checkout (no ``.git``).

In order: ``git rev-parse HEAD`` in the checkout; the ``ENGRAM_COMMIT`` environment variable;
the ``COMMIT`` file at the checkout's root, which ``bench/gpu-check --stamp-commit`` writes
from git before the checkout is copied to a machine without it; else "unknown". Standard
library only (``bench/gpu-check`` imports it before it knows that torch imports).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = "ENGRAM_COMMIT"
FILE = "COMMIT"


def _git(repo: Path, *args: str) -> str | None:
    if shutil.which("git") is None or not (repo / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def from_git(repo: Path = REPO) -> dict | None:
    commit = _git(repo, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty, "commit_from": "git"}


def _parse(text: str, source: str) -> dict | None:
    """``<commit>`` or ``<commit> dirty`` (what :func:`stamp` writes)."""
    words = text.split()
    if not words:
        return None
    dirty = None if len(words) < 2 else words[1] == "dirty"
    return {"commit": words[0], "dirty": dirty, "commit_from": source}


def git_commit(repo: Path = REPO, environ: dict | None = None) -> dict:
    """``{commit, dirty, commit_from}``: git, else the variable, else the file, else unknown."""
    environ = os.environ if environ is None else environ
    got = from_git(repo) or _parse(environ.get(ENV, ""), f"${ENV}")
    if got is None and (repo / FILE).is_file():
        got = _parse((repo / FILE).read_text(errors="replace"), FILE)
    return got or {"commit": "unknown", "dirty": None, "commit_from": None}


def stamp(repo: Path = REPO) -> Path:
    """Write the checkout's git commit to ``COMMIT`` (for a copy without ``.git``)."""
    got = from_git(repo)
    if got is None:
        raise RuntimeError(f"{repo} is not a git checkout: nothing to stamp")
    path = repo / FILE
    path.write_text(got["commit"] + (" dirty" if got["dirty"] else "") + "\n")
    return path
