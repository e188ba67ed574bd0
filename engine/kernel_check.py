"""The start-up kernel check: every kernel the server will use, against its reference, on a
small case with the model's real shapes and dtype, before the first request.

- attention decode and prefill (the Triton paged kernels, when the engine uses them) against
  a float32 torch computation over the same paged cache; ``--attention reference`` avoids them;
- the Engram row gather on the engine's path and the tables' row format (every path 'auto'
  switches between), bit for bit against the table itself; ``--gather staged`` avoids the UVA
  kernel, ``--gather uva`` the staged copy;
- decode CUDA graphs: each captured bucket checked is replayed and its pieces run eagerly on
  the same static inputs; ``--enforce-eager`` avoids the graphs.

A mismatch raises :class:`KernelCheckError` with one line naming the kernel, the error and the
flag that avoids it. Everything here is small (a few sequences, a few hundred rows) so the
check costs well under a second once the kernels are compiled (the warm-up compiles them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from offload.hot_rows import HotRows, row_sources
from offload.plan import LookupPlan
from offload.prefetch import Prefetcher

from . import paged_attention

# max abs error against a float32 reference of O(1) values; a broken kernel is off by O(0.1-1)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-2}
GRAPH_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # relative
DECODE_CONTEXTS = (1, 17, 64, 100)
PREFILL = ((0, 33), (20, 17), (5, 1))  # (cached prefix, new tokens) per sequence
GATHER_ROWS = 256
GATHER_FLAGS = {
    "uva": "--gather staged",
    "staged": "--gather uva",
    "worker": "--gather resident",
}


@dataclass(frozen=True)
class Kernels:
    """The attention kernels the check runs: the serving path's (a test passes a wrong one)."""

    decode: Callable = paged_attention.paged_attention_decode
    prefill: Callable = paged_attention.paged_attention_prefill


@dataclass
class Checked:
    kernel: str
    error: float
    tolerance: float
    flag: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)  # NaN fails

    def line(self) -> str:
        return f"{self.kernel} {self.error:.3g} <= {self.tolerance:.3g}"


class KernelCheckError(RuntimeError):
    """A kernel disagreed with its reference at start-up (one line: kernel, error, flag)."""

    def __init__(self, checked: Checked) -> None:
        avoid = f"start with {checked.flag} to avoid it" if checked.flag else "no flag avoids it"
        super().__init__(
            f"start-up kernel check failed: {checked.kernel}: max abs error {checked.error:.3g} "
            f"against the reference (tolerance {checked.tolerance:.3g}); {avoid}"
        )
        self.checked = checked


# --- attention -------------------------------------------------------------------------------
def _paged_case(ctx_lens, kv_heads, head_dim, block_size, max_blocks, dtype, device, gen):
    """K/V in shuffled blocks of a small paged cache, one block table row per sequence."""
    per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(ctx_lens), max_blocks, dtype=torch.int32)
    for s, n in enumerate(per_seq):
        tables[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return k.to(device), v.to(device), tables.to(device), ctx.to(device)


def _reference(q, k, v, tables, q_lens, ctx_lens, block_size, scale) -> torch.Tensor:
    """Causal attention in float32 over each sequence's context, gathered through its table."""
    group = q.shape[1] // k.shape[1]
    out, row = torch.zeros(q.shape, dtype=torch.float32, device=q.device), 0
    for s, (n_q, n) in enumerate(zip(q_lens, ctx_lens)):
        pos = torch.arange(n, device=q.device)
        slots = tables[s, pos // block_size].long() * block_size + pos % block_size
        ks = k[slots].float().repeat_interleave(group, 1)
        vs = v[slots].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[row : row + n_q].float(), ks) * scale
        q_pos = torch.arange(n - n_q, n, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[row : row + n_q] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
        row += n_q
    return out


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).abs().max()
    return float(err) if torch.isfinite(err) else float("nan")


def check_attention(engine, kernels: Kernels) -> list[Checked]:
    mc, cache = engine.model.config, engine.cache
    dtype, dev, bs = cache.k[0].dtype, cache.device, cache.block_size
    heads, kv_heads, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    max_blocks = -(-mc.max_position_embeddings // bs)
    scale, gen = hd**-0.5, torch.Generator().manual_seed(0)
    tol, flag = TOLERANCE[dtype], "--attention reference"
    out = []

    t = time.perf_counter()
    ctx = [min(c, mc.max_position_embeddings) for c in DECODE_CONTEXTS]
    k, v, tables, lens = _paged_case(ctx, kv_heads, hd, bs, max_blocks, dtype, dev, gen)
    q = torch.randn(len(ctx), heads, hd, generator=gen).to(dtype).to(dev)
    got = kernels.decode(q, k, v, tables, lens, bs, scale)
    want = _reference(q, k, v, tables, [1] * len(ctx), ctx, bs, scale)
    err = _max_error(got, want)
    out.append(Checked("attention decode", err, tol, flag, time.perf_counter() - t))

    t = time.perf_counter()
    cases = [(min(p, mc.max_position_embeddings - n), n) for p, n in PREFILL]
    ctx, q_lens = [p + n for p, n in cases], [n for _, n in cases]
    k, v, tables, lens = _paged_case(ctx, kv_heads, hd, bs, max_blocks, dtype, dev, gen)
    q = torch.randn(sum(q_lens), heads, hd, generator=gen).to(dtype).to(dev)
    qsl = torch.tensor(np.cumsum([0, *q_lens]), dtype=torch.int32, device=dev)
    got = kernels.prefill(q, k, v, tables, qsl, lens, max(q_lens), bs, scale)
    want = _reference(q, k, v, tables, q_lens, ctx, bs, scale)
    err = _max_error(got, want)
    out.append(Checked("attention prefill", err, tol, flag, time.perf_counter() - t))
    return out


# --- the row gather --------------------------------------------------------------------------
def _paths(pf: Prefetcher) -> list[Prefetcher]:
    """The prefetchers that serve rows: 'auto' switches between its staged and UVA ones; a
    hot-row cache is checked behind its tier's paths (hits and misses assembled)."""
    if isinstance(pf, HotRows):
        return [*_paths(pf.inner), pf]
    while isinstance(getattr(pf, "inner", None), Prefetcher):  # the file tier: its DRAM cache
        pf = pf.inner
    inner = [getattr(pf, name, None) for name in ("uva", "staged")]
    return [p for p in inner if isinstance(p, Prefetcher)] or [pf]


def check_gather(pf: Prefetcher, device: torch.device, rows: int = GATHER_ROWS) -> list[Checked]:
    """Rows of every table through each path, against the stored rows decoded in torch; any
    differing bit fails (the error is the share of rows that differ). A backbone without
    Engram tables has no gather to check."""
    out = []
    if not pf.store.tables:
        return out
    rng = np.random.default_rng(0)
    for path in _paths(pf):
        t = time.perf_counter()
        sources = row_sources(path)  # behind the file tier: the file, not the DRAM cache
        ids = {  # no more than the store holds: a DRAM cache takes every miss at once
            lid: rng.integers(0, src.rows, (min(rows, src.rows, path.store[lid].rows), 1))
            for lid, src in sources.items()
        }
        plan: LookupPlan = path.plan(ids)
        pending = path.start(plan)
        bad = total = 0
        formats = set()
        try:
            for lid, table in path.store.tables.items():
                got = pending.rows(lid).reshape(ids[lid].shape[0], -1)
                want = table.decode(sources[lid].read(ids[lid].reshape(-1))).to(got.device)
                formats.add(table.fmt.name if table.fmt is not None else str(table.tensor.dtype))
                total += got.shape[0]
                if got.dtype != want.dtype or got.shape != want.shape:
                    bad += got.shape[0]
                    continue
                a = got.contiguous().view(torch.uint8).reshape(got.shape[0], -1)
                b = want.contiguous().view(torch.uint8).reshape(got.shape[0], -1)
                bad += int((a != b).any(dim=1).sum())
        finally:
            pending.close()
        path.flush()
        hot = " + hot rows" if isinstance(path, HotRows) else ""
        name = f"Engram row gather ({path.name}{hot}, {'/'.join(sorted(formats))} rows)"
        flag = GATHER_FLAGS.get(path.name, "")
        out.append(Checked(name, bad / max(1, total), 0.0, flag, time.perf_counter() - t))
    return out


# --- decode graphs ---------------------------------------------------------------------------
def check_graphs(engine, sizes: tuple[int, ...] | None = None) -> list[Checked]:
    """Replay vs eager for the smallest and largest captured buckets, on padding rows that
    read (context 5 of block 0, spare conv slot) and write nothing."""
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is None or not any(b.graphs for b in graphs.buckets.values()):
        return []
    captured = sorted(s for s, b in graphs.buckets.items() if b.graphs)
    sizes = sizes or tuple(dict.fromkeys((captured[0], captured[-1])))
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    out = []
    for size in sizes:
        t = time.perf_counter()
        parts = graphs.padding_inputs(size)
        parts["input_ids"] = rng.integers(0, vocab, size)
        parts["positions"] = np.full(size, 4, dtype=np.int64)
        parts["context_lens"] = np.full(size, 5, dtype=np.int32)
        replayed = graphs.run_bucket(size, parts, replay=True)
        eager = graphs.run_bucket(size, parts, replay=False)
        scale = float(eager.float().abs().max()) or 1.0
        err = _max_error(replayed, eager) / scale
        tol = GRAPH_TOLERANCE[eager.dtype]
        name = f"decode CUDA graph replay vs eager (batch {size}, relative)"
        out.append(Checked(name, err, tol, "--enforce-eager", time.perf_counter() - t))
    return out


# --- all of it -------------------------------------------------------------------------------
def check_kernels(engine, kernels: Kernels | None = None, strict: bool = True) -> list[Checked]:
    """Run every check that applies to ``engine``; with ``strict`` raise
    :class:`KernelCheckError` for the first kernel outside its tolerance. Returns what was
    checked (``Checked.ok`` says how each went)."""
    kernels = kernels or Kernels()
    checked: list[Checked] = []
    with torch.inference_mode():
        if engine.runner.attention == "triton":
            checked += check_attention(engine, kernels)
        checked += check_gather(engine.runner.rows, engine.cache.device)
        checked += check_graphs(engine)
    if engine.cache.device.type == "cuda":
        torch.cuda.synchronize(engine.cache.device)
    for c in checked:
        if strict and not c.ok:
            raise KernelCheckError(c)
    return checked


def summary(checked: list[Checked]) -> str:
    if not checked:  # the reference attention and no Engram tables: nothing custom runs
        return "kernel check: no custom kernel on this path"
    return "kernel check passed: " + "; ".join(c.line() for c in checked)
