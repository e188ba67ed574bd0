"""One stage of ``bench/gpu-check``: its own process and session, inside a time budget.

A stage's stdout goes to ``logs/<stage>.log`` between two timestamped lines of ours, its stderr
to ``logs/<stage>.stderr.log`` (the tail of which says why a stage failed). Children run with
``PYTHONUNBUFFERED=1``, so a stage killed mid-way still leaves what it printed. A stage over its
budget is killed with SIGKILL (a CUDA process sent SIGTERM while loading has crashed on the way
out) and waited for, but not for ever: a process stuck in the driver is left behind, said so.

Budgets: each stage has a weight. When a stage starts, the time left to the deadline is shared
by weight between it and the stages after it that can run: the stages always fit the deadline,
and what a stage leaves unused goes to the ones after it. Standard library only.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .phase import stamp

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "numpy", "safetensors", "tokenizers", "tqdm")
MISSING_HINT = (
    "pip install them; without network, `pip install --target DIR ...` where there is one, "
    "copy DIR here and run PYTHONPATH=DIR bench/gpu-check"
)
KILL_WAIT_S = 20.0  # how long a SIGKILLed stage is waited for
TAIL_LINES = 12


@dataclass
class Stage:
    name: str
    title: str
    argv: list[str]
    read: Callable[[Path, int], tuple[str, str, dict]]  # (status, one line, data)
    needs: tuple[str, ...] = NEEDED
    env: dict[str, str] = field(default_factory=dict)
    min_s: float = 15.0
    weight: float = 1.0  # its share of the deadline
    partial: Callable[[Path], str] | None = None  # what a stage that ran out of time got done


@dataclass
class Outcome:
    name: str
    title: str
    status: str  # passed | failed | timed out | not run
    seconds: float = 0.0
    detail: str = ""
    log: str | None = None
    budget_s: float | None = None
    stderr_tail: str = ""  # the last lines of its stderr, when it did not pass
    data: dict = field(default_factory=dict)


def caps(stages: list[Stage], total_s: float) -> dict[str, float]:
    """Each stage's share of ``total_s`` by weight."""
    weight = sum(s.weight for s in stages) or 1.0
    return {s.name: total_s * s.weight / weight for s in stages}


def share(stage: Stage, later: list[Stage], deadline: float) -> float:
    """Seconds ``stage`` may run: the time left to the deadline, shared by weight between it
    and the stages still to run after it (so time an earlier stage left goes to all of them)."""
    weight = stage.weight + sum(s.weight for s in later)
    return (deadline - time.monotonic()) * stage.weight / weight


def can_run(stage: Stage, have: dict[str, bool]) -> list[str]:
    """The modules ``stage`` needs that do not import here."""
    return [m for m in stage.needs if not have.get(m)]


def tail(path: Path, lines: int = TAIL_LINES, chars: int = 1500) -> str:
    """The last lines of a log (progress bars' carriage returns split too)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    got: list[str] = []
    for line in re.split(r"[\r\n]+", text):
        line = line.rstrip()
        if line.strip() and (not got or got[-1] != line):
            got.append(line)
    return "\n".join(got[-lines:])[-chars:]


def _last_line(log: Path) -> str:
    lines = tail(log, 1).splitlines()
    return lines[-1].strip()[:200] if lines else ""


def _kill(proc: subprocess.Popen) -> str:
    """SIGKILL the stage's session and wait for it a while; '' or what is left behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        return (
            f"; pid {proc.pid} still there {KILL_WAIT_S:.0f} s after SIGKILL (stuck in the driver?)"
        )
    return ""


def run_stage(
    stage: Stage,
    work: Path,
    budget_s: float,
    have: dict[str, bool],
    tick: Callable[[], None] | None = None,
    tick_s: float = 20.0,
) -> Outcome:
    """Run ``stage`` for at most ``budget_s`` with its outputs under ``work``; ``tick()`` is
    called every ``tick_s`` while it runs (the caller packs the logs so far)."""
    o = Outcome(stage.name, stage.title, "not run")
    missing = can_run(stage, have)
    if missing:
        o.detail = f"needs {', '.join(missing)}, which do not import here: {MISSING_HINT}"
        return o
    if budget_s < stage.min_s:
        o.detail = f"out of time: {max(0.0, budget_s):.0f} s left for it within the deadline"
        return o
    o.budget_s = budget_s
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log, err = work / "logs" / f"{stage.name}.log", work / "logs" / f"{stage.name}.stderr.log"
    o.log = str(log.relative_to(work))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", **os.environ, "PYTHONPATH": path}
    env.update(PYTHONUNBUFFERED="1", **stage.env)
    t0 = time.monotonic()
    end = t0 + budget_s
    with log.open("w") as f, err.open("w") as e:
        f.write(stamp(f"start {stage.name}, budget {budget_s:.0f} s") + "\n")
        f.write(f"$ {shlex.join(stage.argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            stage.argv, cwd=REPO, env=env, stdout=f, stderr=e, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        rc = None
        try:
            while rc is None and time.monotonic() < end:
                try:
                    rc = proc.wait(timeout=max(0.01, min(tick_s, end - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if tick is not None and time.monotonic() < end:
                        tick()
        except KeyboardInterrupt:  # the stage runs in its own session: stop it too
            _kill(proc)
            raise
        if rc is None:
            left = _kill(proc)
            o.seconds = time.monotonic() - t0
            f.write(
                "\n" + stamp(f"killed after {o.seconds:.0f} s (budget {budget_s:.0f} s)") + "\n"
            )
            o.status = "timed out"
            done = stage.partial(log) if stage.partial else f"last: {_last_line(log)}"
            o.detail = f"stopped after {budget_s:.0f} s; {done}{left}"
            o.stderr_tail = tail(err)
            return o
        o.seconds = time.monotonic() - t0
        f.write("\n" + stamp(f"exit status {rc} after {o.seconds:.1f} s") + "\n")
    try:
        o.status, o.detail, o.data = stage.read(work, rc)
    except (OSError, ValueError, KeyError, TypeError, IndexError, SyntaxError) as ex:
        # no result, or not the one expected (SyntaxError: XML's ParseError): say so, go on
        o.status = "failed"
        why = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        o.detail = f"{why}, no result ({type(ex).__name__}: {ex}); last: {_last_line(log)}"
    if o.status != "passed" or rc != 0:
        o.stderr_tail = tail(err)
    return o


def exit_code(outcomes: list[Outcome]) -> int:
    if any(o.status in ("failed", "timed out") for o in outcomes):
        return 1
    return 2 if any(o.status == "not run" for o in outcomes) else 0
