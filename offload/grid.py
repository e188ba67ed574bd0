"""The UVA gather's persistent grid: how many programs it runs beside the forward pass.

The gather runs on a side stream while the compute stream runs the step's first layers, so
its programs take SMs from compute. Two rules:

- A bound: at most ``SM_SHARE`` of the SMs, one program each (vLLM's background lookups take
  half). A persistent program loops over tiles of rows, so fewer programs still cover any
  number of rows; the bound only caps how many SMs the gather can hold at once.
- A measurement of the step, not of the gather alone: for each grid within the bound, a
  stand-in for compute (matrix products) runs on the compute stream while the gather runs on
  a side stream, and the time until both are done is the figure. The fastest grid wins; one
  within ``TIE`` of it with fewer programs wins instead (it leaves more SMs to compute for the
  same step).
- The stand-in's size decides what the figure can see. It is the step's own compute when the
  caller knows it (``compute_s``), else as long as the *fastest* gather alone: then a grid
  whose gather is slower lengthens the step, and a grid whose programs slow compute lengthens
  it too. Sized to the slowest gather (as before), every gather hid under compute and every
  grid measured the same step, so the fewest programs always won.

Measured on H100 (shared measurements, 2026-11-25) the gather alone barely depended on its grid
(8x or 32x the SM count, within 20%), so taking most of the GPU buys nothing in isolation and
costs compute when they overlap.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SM_SHARE = 0.5
TIE = 0.03  # grids within 3% of the fastest joined step count as equally fast
ROWS = 1 << 16  # rows of the gather the grid is chosen on (a large step's worth)
STAND_IN = 2048  # bf16 matrix side of the compute stand-in
MAX_UNITS = 10_000  # most stand-in products in one joined measurement


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def max_programs(sms: int, share: float = SM_SHARE) -> int:
    """The most programs the gather may run: one per SM on ``share`` of the SMs."""
    return max(1, int(sms * share))


def candidates(sms: int, share: float = SM_SHARE) -> tuple[int, ...]:
    """Grids tried within the bound: a quarter, a half and all of the allowed SMs."""
    cap = max_programs(sms, share)
    return tuple(sorted({max(1, cap // 4), max(1, cap // 2), cap}))


@dataclass
class GridChoice:
    """What was measured and chosen, for logs and bench.json."""

    programs: int
    sms: int
    bound: int  # most programs allowed (SM_SHARE of the SMs)
    rows: int  # rows per measured gather
    compute_s: float  # the compute stand-in alone
    gather_s: dict[int, float]  # the gather alone, per grid
    step_s: dict[int, float]  # compute and gather together (both done), per grid
    why: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gather_s"] = {str(k): v for k, v in self.gather_s.items()}
        d["step_s"] = {str(k): v for k, v in self.step_s.items()}
        return d


def pick(step_s: dict[int, float], tie: float = TIE) -> tuple[int, str]:
    """The grid with the shortest joined step, preferring fewer programs within ``tie``."""
    best = min(step_s.values())
    chosen = min(p for p, s in step_s.items() if s <= best * (1 + tie))
    fastest = min(step_s, key=step_s.get)
    if chosen == fastest:
        why = f"fastest step beside compute ({best * 1e3:.3f} ms)"
    else:
        why = (
            f"step within {tie:.0%} of the fastest ({fastest} programs, {best * 1e3:.3f} ms) "
            f"with fewer programs ({step_s[chosen] * 1e3:.3f} ms)"
        )
    return chosen, why


def _elapsed(fn: Callable[[], None], stream: torch.cuda.Stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def stand_in_units(alone: dict[int, float], unit_s: float, compute_s: float | None) -> int:
    """Stand-in matrix products for the joined measurement: ``compute_s`` worth when given,
    else as long as the fastest gather alone (see the module docstring)."""
    target = compute_s if compute_s is not None else min(alone.values())
    return min(MAX_UNITS, max(1, round(target / max(unit_s, 1e-9))))


def measure(
    grids: tuple[int, ...],
    alone: Callable[[int], float],
    unit: Callable[[], float],
    compute: Callable[[int], float],
    joined: Callable[[int, int], float],
    repeats: int = 5,
    compute_s: float | None = None,
) -> tuple[dict[int, float], float, dict[int, float]]:
    """The grid measurement with its timers passed in (CUDA events on a GPU, a model of one in
    the tests): ``alone(p)`` one gather, ``unit()`` one stand-in product, ``compute(n)`` n of
    them, ``joined(p, n)`` gather and n products together. Returns (gather alone per grid,
    the stand-in alone, the joined step per grid), medians of ``repeats``."""
    gather_s = {p: statistics.median(alone(p) for _ in range(repeats)) for p in grids}
    unit_s = statistics.median(unit() for _ in range(repeats))
    n = stand_in_units(gather_s, unit_s, compute_s)
    stand_in_s = statistics.median(compute(n) for _ in range(repeats))
    step: dict[int, list[float]] = {p: [] for p in grids}
    for r in range(repeats):  # interleaved rounds, rotated, so drift spreads over every grid
        for i in range(len(grids)):
            p = grids[(i + r) % len(grids)]
            step[p].append(joined(p, n))
    return gather_s, stand_in_s, {p: statistics.median(v) for p, v in step.items()}


def choose_grid(
    gather: Callable[[int], None],
    device: torch.device,
    rows: int = ROWS,
    repeats: int = 5,
    share: float = SM_SHARE,
    compute_s: float | None = None,
) -> GridChoice:
    """Measure ``gather(programs)`` (one gather of ``rows`` rows on the current stream) at each
    candidate grid, alone and beside the compute stand-in; choose by the joined step.
    ``compute_s``: the step's compute the gather overlaps, when known."""
    device = torch.device(device)
    sms = sm_count(device)
    grids = candidates(sms, share)
    compute_stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    a = torch.randn(STAND_IN, STAND_IN, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for p in grids:  # compile and warm up
        gather(p)
    torch.mm(a, a, out=c)
    torch.cuda.synchronize(device)

    def products(n: int) -> None:
        for _ in range(n):
            torch.mm(a, a, out=c)

    def together(p: int, n: int) -> None:
        side.wait_stream(compute_stream)
        with torch.cuda.stream(side):
            gather(p)
        products(n)
        compute_stream.wait_stream(side)

    alone, stand_in_s, step_s = measure(
        grids,
        lambda p: _elapsed(lambda: gather(p), compute_stream),
        lambda: _elapsed(lambda: products(1), compute_stream),
        lambda n: _elapsed(lambda: products(n), compute_stream),
        lambda p, n: _elapsed(lambda: together(p, n), compute_stream),
        repeats,
        compute_s,
    )
    chosen, why = pick(step_s)
    return GridChoice(chosen, sms, max_programs(sms, share), rows, stand_in_s, alone, step_s, why)
