"""The three checks of every path against the resident baseline.

- rows: for the first steps of each job, every Engram row a path hands the model is compared
  bit for bit with the reference table indexed by the same ids (always required);
- tokens: every run's greedy tokens against the baseline's first run (identical in
  deterministic mode, required there; otherwise the share that matches is reported);
- logits: the largest absolute difference to the baseline's logits over the first steps.

Rows are checked where the model takes them (``rows(layer)`` of the pending step, on the eager
path and between CUDA-graph pieces alike), so what is compared is what the forward pass
reads, on every path, without changing any gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.engine import EngineStats
from offload.plan import LookupPlan
from offload.prefetch import PendingRows, Prefetcher
from offload.store import Table


def issue(
    prefetcher: Prefetcher,
    plan: LookupPlan,
    index: dict[str, torch.Tensor] | None,
    uploaded: object | None,
) -> PendingRows:
    """Issue one step's gathers on a path: the bench's one call into the prefetcher."""
    return prefetcher.start(plan, index, uploaded)


# --- rows -------------------------------------------------------------------------------------
@dataclass
class RowCheck:
    steps: int = 0
    rows: int = 0
    mismatched: int = 0
    mismatched_by_layer: dict[int, int] = field(default_factory=dict)
    first: str | None = None  # where the first mismatch was

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "steps": self.steps,
            "rows": self.rows,
            "mismatched": self.mismatched,
            "mismatched_by_layer": {str(k): v for k, v in self.mismatched_by_layer.items()},
            "first": self.first,
        }


def as_bytes(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, bytes per row]``: the raw bits, so NaNs and signed zeros compare exactly."""
    return t.contiguous().view(torch.uint8).reshape(rows, -1)


class CheckedRows:
    """One step's pending rows; each layer's rows are compared as the model takes them."""

    def __init__(
        self,
        pending: PendingRows,
        plan: LookupPlan,
        reference: dict[int, Table],
        check: RowCheck,
        where: str,
    ) -> None:
        self.pending, self.plan, self.reference, self.check = pending, plan, reference, check
        self.where = where

    def rows(self, layer_id: int) -> torch.Tensor:
        out = self.pending.rows(layer_id)
        table = self.reference[layer_id]
        ids = np.ascontiguousarray(self.plan.layers[layer_id].requested(), dtype=np.int64)
        stored = table.tensor.index_select(0, torch.from_numpy(ids).to(table.tensor.device))
        want = table.decode(stored)  # what the model reads (fp8: the reference dequantisation)
        n = ids.size
        if out.dtype != want.dtype or out.numel() != want.numel():
            bad = n
        else:
            got = as_bytes(out.to(want.device), n)
            bad = int((got != as_bytes(want, n)).any(dim=1).sum())
        self.check.rows += n
        if bad:
            self.check.mismatched += bad
            by = self.check.mismatched_by_layer
            by[layer_id] = by.get(layer_id, 0) + bad
            if self.check.first is None:
                self.check.first = f"{self.where}, Engram layer {layer_id}"
        return out

    def close(self) -> object:
        return self.pending.close()

    def __getattr__(self, name: str):
        return getattr(self.pending, name)


class CheckedPrefetcher:
    """A path's prefetcher as its engine sees it: the same plans and gathers, with the rows
    of the next ``arm(n)`` steps checked as the model takes them."""

    def __init__(
        self, prefetcher: Prefetcher, reference: dict[int, Table], check: RowCheck
    ) -> None:
        self.prefetcher, self.reference, self.check = prefetcher, reference, check
        self.remaining, self.label, self.seen = 0, "", 0

    def arm(self, steps: int, label: str) -> None:
        """Check the rows of the next ``steps`` steps; ``label`` names the run in messages."""
        self.remaining, self.label, self.seen = steps, label, 0

    def plan(self, row_ids: dict[int, np.ndarray]) -> LookupPlan:
        return self.prefetcher.plan(row_ids)

    def start(self, plan: LookupPlan, index=None, uploaded=None) -> PendingRows:
        pending = issue(self.prefetcher, plan, index, uploaded)
        if self.remaining <= 0:
            return pending
        self.remaining -= 1
        self.seen += 1
        self.check.steps += 1
        where = f"{self.label}, step {self.seen}"
        return CheckedRows(pending, plan, self.reference, self.check, where)

    def __getattr__(self, name: str):  # accountant, store, device, close, ...
        return getattr(self.prefetcher, name)


# --- logits -----------------------------------------------------------------------------------
class LogitsCheck(EngineStats):
    """The engine's stats hook: keeps the next ``arm(n)`` steps' logits (the baseline), or
    compares them with the baseline's (every other path)."""

    def __init__(self) -> None:
        self.remaining = self.seen = 0
        self.kept: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] | None = None
        self.max_abs_diff: float | None = None
        self.compared_steps = 0

    def arm(self, steps: int, reference: list[torch.Tensor] | None) -> None:
        """Watch the next ``steps`` steps: keep their logits (``reference`` None) or compare."""
        self.remaining, self.reference, self.kept, self.seen = steps, reference, [], 0

    def step_logits(self, logits: torch.Tensor) -> None:
        if self.remaining <= 0:
            return
        self.remaining -= 1
        k, self.seen = self.seen, self.seen + 1
        got = logits.detach().float().cpu()
        if self.reference is None:
            self.kept.append(got)
            return
        if k >= len(self.reference):
            return
        ref = self.reference[k]
        diff = float("inf") if ref.shape != got.shape else float((got - ref).abs().max())
        self.max_abs_diff = diff if self.max_abs_diff is None else max(self.max_abs_diff, diff)
        self.compared_steps += 1

    def as_dict(self) -> dict:
        return {"steps": self.compared_steps, "max_abs_diff": self.max_abs_diff}


# --- tokens -----------------------------------------------------------------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TokenCheck:
    """Greedy tokens of every run of a path against the baseline's first run. After the first
    difference a sequence's context differs, so only the tokens before it count as identical."""

    runs: int = 0
    tokens: int = 0
    identical: int = 0
    first_difference: str | None = None

    def add(self, label: str, ref: list[list[int]], got: list[list[int]]) -> None:
        self.runs += 1
        for i, (a, b) in enumerate(zip(ref, got)):
            same = common_prefix(a, b)
            self.tokens += len(a)
            self.identical += same
            if (same < len(a) or len(a) != len(b)) and self.first_difference is None:
                self.first_difference = f"{label}, sequence {i}, generated token {same}"

    @property
    def all_identical(self) -> bool:
        return self.identical == self.tokens

    def as_dict(self) -> dict:
        return {
            "runs": self.runs,
            "tokens": self.tokens,
            "identical": self.identical,
            "identical_share": self.identical / self.tokens if self.tokens else None,
            "all_identical": self.all_identical,
            "first_difference": self.first_difference,
        }
