"""Figures from repeated runs: the median with its min-max, and penalties judged against noise.

A figure's spread is the largest distance of any repeat from the median, as a % of the
median: every repeat lies within +-spread% of it. A path's penalty is measured against the
baseline's median; when its magnitude is below the baseline's own spread, the baseline
alone moves that much between repeats, so the penalty is reported as noise.
"""

from __future__ import annotations

import numpy as np


def summarize(raw: list[float]) -> dict:
    """``{median, min, max, spread_pct, raw}``; spread_pct is None with fewer than 2 repeats."""
    if not raw:
        raise ValueError("summarize needs at least one value")
    vals = [float(x) for x in raw]
    med = float(np.median(vals))
    spread = None
    if len(vals) > 1 and med != 0:
        spread = 100.0 * max(med - min(vals), max(vals) - med) / abs(med)
    return {"median": med, "min": min(vals), "max": max(vals), "spread_pct": spread, "raw": vals}


def rates(amount: float, seconds: list[float]) -> dict:
    """``amount / s`` for each repeat's seconds, summarized (e.g. tokens per second)."""
    return summarize([amount / s for s in seconds])


def penalty(value: dict | None, base: dict | None) -> dict:
    """% slower than the baseline from two throughput summaries (positive: slower).

    verdict: 'within noise' when |pct| is below the baseline's spread, 'slower'/'faster'
    when it is not, 'no noise estimate' when the baseline ran once, 'n/a' without figures."""
    if not value or not base or not base["median"] or value["median"] is None:
        return {"pct": None, "noise_pct": None, "verdict": "n/a"}
    pct = 100.0 * (1.0 - value["median"] / base["median"])
    noise = base["spread_pct"]
    if noise is None:
        verdict = "no noise estimate"
    elif abs(pct) < noise:
        verdict = "within noise"
    else:
        verdict = "slower" if pct > 0 else "faster"
    return {"pct": pct, "noise_pct": noise, "verdict": verdict}


def fmt_penalty(p: dict) -> str:
    """'+3.2%', 'within noise (+-4.1%)', '+3.2%*' (no noise estimate: one repeat), or '-'."""
    if p["pct"] is None:
        return "-"
    if p["verdict"] == "within noise":
        return f"within noise (+-{p['noise_pct']:.1f}%)"
    return f"{p['pct']:+.1f}%" + ("*" if p["verdict"] == "no noise estimate" else "")


def fmt_spread(s: dict | None, spec: str = ".1f") -> str:
    """'median (min-max)', or just the median for one repeat."""
    if s is None or s["median"] is None:
        return "-"
    if len(s["raw"]) < 2:
        return format(s["median"], spec)
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"
