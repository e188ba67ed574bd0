"""The file tier: rows stay in the checkpoint's safetensors file, a DRAM cache holds some.

Tiers as index translation. Each file-tier layer has a cache :class:`~offload.store.Table` of C
slots (pinned host memory where CUDA is present, plain host memory otherwise) standing where
the host table would be. When a step's plan is built (on the host, before the forward pass),
every layer's rows are looked up in its cache (:class:`~offload.file_cache.SlotCache`), the
misses' reads from the file into victim slots are issued (:class:`~offload.row_reader.RowReader`:
every layer's pages announced to the kernel at once, then one io_uring syscall per layer, or
``preadv`` per run, by the gather that needs them, or on the tier's issuing threads), and the
layer's row ids are replaced by slot ids at once. A decode step's row ids hash the token the
step before sampled, so its plan cannot be built before that step ends: it stays on the step
worker's critical path.
A layer's gather waits for that layer's reads only (``LayerPlan.source_ready``: its own
misses, and earlier steps' reads still landing in slots it found), so the reads run beside the
plan's other work, the upload and the layers before. Before serving, :meth:`FileTier.warm`
can fill the caches with a profile's most read rows. The existing gather
paths (worker, staged, UVA; sorted and de-duplicated plans) then read the cache table exactly
as they read a host table. Slots a step reads stay pinned until that step's gathers are done
(on CUDA: its end event), so an overlapped next step never evicts them.

A step needing more distinct rows than there are unpinned slots fails with
:class:`~offload.file_cache.CapacityError` (naming ``--host-memory-bytes``): the budget must
hold at least two steps' worth of distinct rows per layer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.safetensors_header import read_header

from .file_cache import CapacityError, SlotCache
from .hot_cache import RowSource
from .plan import check_rows, sorted_unique
from .row_reader import RowReader, open_reader
from .rowformat import PLAIN_DTYPES
from .store import Placement, Table, TableStore, new_table
from .table_load import table_source
from .thread_names import name_os_thread


@dataclass
class FileRead:
    """One step's traffic from the file for one layer."""

    hits: int = 0  # distinct rows found in the DRAM cache
    misses: int = 0  # distinct rows read from the file
    bytes: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0  # how long the layer's gather waited for the read (the file stall)


@dataclass
class FileLayer:
    layer_id: int
    rows: int  # rows of the table in the file
    cache: SlotCache
    reader: RowReader
    table: Table  # the DRAM cache the gathers read: [slots, stored row]
    lock: threading.Lock = field(default_factory=threading.Lock)
    recent: list[Future] = field(default_factory=list)  # reads issued, maybe in flight
    fill_copied: int = 0  # hot-cache fills: rows copied from the DRAM cache
    fill_read: int = 0  # hot-cache fills: rows read from the file (not booked per step)
    warm_rows: int = 0  # rows placed before serving from a profile (FileTier.warm)
    warm_s: float = 0.0
    _bytes: np.ndarray | None = field(default=None, repr=False)

    def unique(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distinct rows of ``ids`` (ascending) and the inverse (flat), bounds-checked."""
        uniq, inverse = sorted_unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if uniq.size:
            check_rows(self.layer_id, int(uniq[0]), int(uniq[-1]), self.rows)
        return uniq, inverse

    def cache_bytes(self) -> np.ndarray:
        """The cache table's bytes, ``[slots, row_bytes]`` (made once: the table never moves)."""
        if self._bytes is None:
            self._bytes = self.table.tensor.view(torch.uint8).reshape(self.cache.slots, -1).numpy()
        return self._bytes


@dataclass
class Ticket:
    """What a step holds: its pinned slots per layer, and its reads (in flight or done)."""

    slots: dict[int, np.ndarray]
    reads: dict[int, FileRead]
    done: object = None  # the step's pending rows (released once its gathers have finished)
    inflight: dict[int, Future] = field(default_factory=dict)  # layer -> its read, issued
    # layer -> reads of earlier steps still in flight when this one was planned: rows this
    # step found in the cache may be landing there
    earlier: dict[int, list[Future]] = field(default_factory=dict)
    # (reader, rows) of the step's misses not yet announced to the kernel (FileTier's
    # announce_in_plan False): the first read of the step to run announces them all
    unannounced: list = field(default_factory=list)
    _once: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def announce(self) -> None:
        """Queue every layer's missed pages in the kernel, once, before the first read: the
        pages of the later layers are on their way while the earlier ones are read (a read
        that comes while another thread announces waits for it)."""
        with self._once:
            todo, self.unannounced = self.unannounced, []
            for reader, rows in todo:
                reader.announce(rows)

    def wait(self, layer_id: int) -> None:
        """Block until the layer's rows are in the DRAM cache (the gather's source rows);
        the time blocked is the layer's file stall. A failed read raises here."""
        earlier, fut = self.earlier.pop(layer_id, []), self.inflight.get(layer_id)
        if not earlier and fut is None:
            return
        t = time.perf_counter()
        for f in earlier:
            f.result()
        if fut is not None:
            self.reads[layer_id] = fut.result()
            self.inflight.pop(layer_id, None)
        if layer_id in self.reads:
            self.reads[layer_id].wait_s += time.perf_counter() - t

    def settle(self) -> None:
        """Wait for every read this step issued, and keep their figures (a failed read's
        error is raised by :meth:`wait`, in the gather that needs it)."""
        wait_all(list(self.inflight.values()))
        for lid, fut in list(self.inflight.items()):
            if fut.exception() is None and self.inflight.pop(lid, None) is not None:
                self.reads[lid] = fut.result()


class LazyRead(Future):
    """A read that runs in the first thread that waits for it (or asks whether it failed):
    its pages were announced to the kernel when it was made, so by then they are arriving."""

    def __init__(self, fn) -> None:
        super().__init__()
        self._fn, self._once = fn, threading.Lock()

    def _run(self) -> None:
        with self._once:
            if not self.done():
                try:
                    self.set_result(self._fn())
                except BaseException as e:
                    self.set_exception(e)

    def result(self, timeout=None):
        self._run()
        return super().result(timeout)

    def exception(self, timeout=None):
        self._run()
        return super().exception(timeout)


def wait_all(futures: list[Future]) -> None:
    """Until every read has ended (a lazy one runs here); errors stay in the futures."""
    for f in futures:
        f.exception()


class FileTier:
    def __init__(
        self,
        layers: dict[int, FileLayer],
        async_reads: bool = True,
        lazy_reads: bool = True,
        announce_in_plan: bool = True,
        submit_in_plan: bool = False,
    ) -> None:
        """``async_reads``: a step's misses are read while the plan goes on and earlier layers
        compute; a gather waits for its own layer only (``Ticket.wait``). With ``lazy_reads``
        the misses' pages are announced to the kernel (``RowReader.announce``: the disk reads
        are queued at once) and the layer's gather copies them in when it needs them, with no
        thread hand-off; without, the reads run on the tier's issuing threads (one per layer,
        each fanning out to its reader's pool). ``async_reads`` False: read before the plan
        returns (the synchronous baseline). ``announce_in_plan`` (default): the lazy reads'
        pages are announced while the plan is built, on the step worker's critical path (a
        syscall per page span); False: the step's first gather announces every layer's while
        the layers before it compute: a cheaper plan, but reads with less head start (the bench
        row ``file + DRAM, announced by the first gather`` of ``engram-bench --tiers``).
        ``submit_in_plan``: with an io_uring reader, the plan submits each layer's reads
        (one syscall, not waited for) and the gather only reaps them."""
        self.layers, self.async_reads, self.lazy_reads = layers, async_reads, lazy_reads
        self.announce_in_plan, self.submit_in_plan = announce_in_plan, submit_in_plan
        self._issue = ThreadPoolExecutor(max(1, len(layers)), "engram-file-io", name_os_thread)

    def translate(self, row_ids: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], Ticket]:
        """Table rows -> DRAM slots for every file-tier layer (others pass through), the
        misses' reads issued (or done, without ``async_reads``). The ticket must be released
        once the step's gathers are done."""
        ticket = Ticket({}, {})
        out = dict(row_ids)
        try:
            for lid, fl in self.layers.items():
                if lid in row_ids:
                    out[lid] = self._layer(fl, np.asarray(row_ids[lid]), ticket)
        except BaseException:
            self.release(ticket)
            raise
        return out, ticket

    def _layer(self, fl: FileLayer, ids: np.ndarray, ticket: Ticket) -> np.ndarray:
        lid = fl.layer_id
        uniq, inverse = fl.unique(ids)
        with fl.lock:
            fl.recent = [f for f in fl.recent if not f.done()]
            if fl.recent:
                ticket.earlier[lid] = list(fl.recent)
            try:
                slots, miss_rows, victims = fl.cache.admit(uniq)
            except CapacityError as e:
                raise CapacityError(
                    f"Engram layer {lid}: {e}; raise --host-memory-bytes (the DRAM cache must "
                    "hold two steps' distinct rows)"
                ) from None
        ticket.slots[lid] = slots
        hits = uniq.size - miss_rows.size
        if self.async_reads and miss_rows.size:
            if self.lazy_reads and self.submit_in_plan and hasattr(fl.reader, "submit"):
                fut = self._submit(fl, miss_rows, victims, hits)
            elif self.lazy_reads:  # the step's one fadvise per page span, then the reads
                if self.announce_in_plan:
                    fl.reader.announce(miss_rows)
                else:
                    ticket.unannounced.append((fl.reader, miss_rows))
                fut = LazyRead(lambda: self._read(fl, miss_rows, victims, hits, ticket))
            else:
                fut = self._issue.submit(self._read, fl, miss_rows, victims, hits)
            ticket.inflight[lid] = fut
            with fl.lock:
                fl.recent.append(fut)
        else:
            ticket.reads[lid] = self._read(fl, miss_rows, victims, hits)
        return slots[inverse].astype(np.int64).reshape(ids.shape)

    def _submit(self, fl: FileLayer, rows: np.ndarray, slots: np.ndarray, hits: int) -> Future:
        """The layer's reads submitted now; the returned read reaps them (in the gather)."""
        try:
            pending = fl.reader.submit(rows, slots, fl.cache_bytes())
        except BaseException:
            with fl.lock:
                fl.cache.invalidate(slots)
            raise
        return LazyRead(lambda: self._read(fl, rows, slots, hits, pending=pending))

    def _read(
        self, fl: FileLayer, rows: np.ndarray, slots: np.ndarray, hits: int, ticket=None,
        pending=None,
    ) -> FileRead:  # fmt: skip
        """``ticket``: a lazy read's step (its pages announced, or announced here first)."""
        if rows.size == 0:
            return FileRead(hits)
        t = time.perf_counter()
        try:
            if pending is not None:  # submitted by the plan
                nbytes = fl.reader.finish(pending)
            else:
                if ticket is not None:
                    ticket.announce()
                nbytes = fl.reader.read(rows, slots, fl.cache_bytes(), ticket is not None)
        except BaseException:
            with fl.lock:  # the slots hold no row now (still pinned: the ticket releases them)
                fl.cache.invalidate(slots)
            raise
        return FileRead(hits, rows.size, nbytes, time.perf_counter() - t)

    def warm(self, ranked: dict[int, np.ndarray]) -> dict[int, int]:
        """Fill each layer's DRAM cache before serving with its most read rows (``ranked``:
        row ids most read first, e.g. ``engram-profile``'s file), as many as the cache holds,
        read in ascending order (adjacent rows coalesce into one ``preadv``). Returns the rows
        placed per layer; a layer not in the tier is ignored."""
        placed = {}
        for lid, rows in ranked.items():
            fl = self.layers.get(lid)
            if fl is None:
                continue
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            rows = rows[(rows >= 0) & (rows < fl.rows)]
            t = time.perf_counter()
            with fl.lock:
                rows, slots = fl.cache.preload(rows)
            try:
                fl.reader.read(rows, slots, fl.cache_bytes())
            except BaseException:
                with fl.lock:
                    fl.cache.forget(slots)
                raise
            with fl.lock:
                fl.cache.release(slots)
            fl.warm_rows += int(rows.size)
            fl.warm_s += time.perf_counter() - t
            placed[lid] = int(rows.size)
        return placed

    def read_rows(self, layer_id: int, ids: np.ndarray) -> np.ndarray:
        """Stored bytes of table rows ``ids`` (any order, repeats allowed) as uint8
        ``[n, row_bytes]``, bit for bit as in the file: rows the DRAM cache holds are copied
        from it (pinned while copied), the rest read through the tier's reader into a scratch
        array (not admitted: the hot cache's fills and refreshes do not evict serving rows)."""
        fl = self.layers[layer_id]
        uniq, inverse = fl.unique(ids)
        out = np.empty((uniq.size, fl.reader.row_bytes), dtype=np.uint8)
        with fl.lock:
            slots = fl.cache.directory.lookup(uniq).astype(np.int64)
            held = np.flatnonzero(slots >= 0)
            fl.cache.pins[slots[held]] += 1
            landing = [f for f in fl.recent if not f.done()]  # reads maybe filling those slots
        try:
            wait_all(landing)
            with fl.lock:  # a failed read emptied its slots (pins kept them from reuse)
                ok = fl.cache.row_of_slot[slots[held]] == uniq[held]
            out[held[ok]] = fl.cache_bytes()[slots[held[ok]]]
        finally:
            with fl.lock:
                fl.cache.release(slots[held])
        slots[held[~ok]] = -1
        missing = np.flatnonzero(slots < 0)
        fl.reader.read(uniq[missing], missing, out)  # rows of the file into rows of ``out``
        with fl.lock:
            fl.fill_copied += int(uniq.size - missing.size)
            fl.fill_read += int(missing.size)
        return out[inverse]

    def row_source(self, layer_id: int) -> RowSource:
        """The layer's rows by table id in the cache table's stored dtype (the hot cache's
        fills and refreshes read the file tier through this)."""
        dtype = self.layers[layer_id].table.tensor.dtype
        read = lambda ids: torch.from_numpy(self.read_rows(layer_id, ids)).view(dtype)
        return RowSource(self.layers[layer_id].rows, read)

    def release(self, ticket: Ticket) -> None:
        ticket.settle()  # no read may still write a slot once its pin is gone
        for lid, slots in ticket.slots.items():
            with self.layers[lid].lock:
                self.layers[lid].cache.release(slots)
        ticket.slots = {}

    def check_capacity(self, rows_per_step: int) -> None:
        """ValueError naming --host-memory-bytes when two overlapped steps of at most
        ``rows_per_step`` distinct rows could pin more than a layer's cache holds."""
        for lid, fl in self.layers.items():
            need = min(2 * rows_per_step, fl.rows)
            if fl.cache.slots < need:
                per_row = fl.reader.row_bytes
                raise ValueError(
                    f"Engram layer {lid}: the DRAM cache holds {fl.cache.slots} rows but two "
                    f"overlapped steps may read {need} ({rows_per_step} lookups a step): raise "
                    f"--host-memory-bytes (this layer needs >= {need * per_row} bytes) or lower "
                    "--max-num-batched-tokens"
                )

    @property
    def file_bytes(self) -> int:
        return sum(fl.rows * fl.reader.row_bytes for fl in self.layers.values())

    def close(self) -> None:
        self._issue.shutdown(wait=True)
        for fl in self.layers.values():
            fl.reader.close()

    def describe(self) -> dict:
        return {
            str(lid): {
                "rows": fl.rows,
                "cache_slots": fl.cache.slots,
                "cache_bytes": fl.table.nbytes,
                "directory": fl.cache.directory_kind,
                "directory_bytes": fl.cache.directory_bytes,
                "read_threads": fl.reader.threads,
                "file_io": fl.reader.io,
                "submit_in_plan": self.submit_in_plan,
                "async_reads": self.async_reads,
                "lazy_reads": self.lazy_reads,
                "announce_in_plan": self.announce_in_plan,
                "hot_fill_rows_copied": fl.fill_copied,
                "hot_fill_rows_read": fl.fill_read,
                "warm_rows": fl.warm_rows,
                "warm_s": round(fl.warm_s, 4),
            }
            for lid, fl in self.layers.items()
        }


def cache_slots(nbytes: dict[int, int], row_bytes: dict[int, int], budget: int) -> dict[int, int]:
    """The DRAM budget split across layers by table size, in whole rows (at least one)."""
    total = max(sum(nbytes.values()), 1)
    return {
        lid: max(
            1, min(nbytes[lid] // row_bytes[lid], budget * nbytes[lid] // total // row_bytes[lid])
        )
        for lid in nbytes
    }


def open_file_tier(
    path: str | Path,
    keys: dict[int, str],
    budget_bytes: int,
    placement: Placement,
    device: torch.device,
    row_dtype: torch.dtype = torch.bfloat16,
    threads: int = 4,
    huge_pages: bool = True,
    directory: str = "auto",
    file_io: str = "auto",
) -> tuple[TableStore, FileTier]:
    """DRAM caches (a store of ``placement``: cpu or host) over the tables ``keys`` of a
    safetensors file, and the tier that fills them. Stored rows are served as they are (bf16
    rows, packed fp8; split fp8 packed into the slot); a truncated file is refused here.
    ``file_io``: how rows are read (row_reader.FILE_IO: auto, uring, pread)."""
    if budget_bytes < 1:
        raise ValueError("the file tier needs a DRAM budget: set --host-memory-bytes")
    header = read_header(path)
    sources = {lid: table_source(header, key) for lid, key in keys.items()}
    sizes = {lid: s.rows * s.row_bytes for lid, s in sources.items()}
    slots = cache_slots(sizes, {lid: s.row_bytes for lid, s in sources.items()}, budget_bytes)
    tables, layers = {}, {}
    for lid, src in sources.items():
        fp8 = src.fmt.name == "fp8"
        dtype = row_dtype if fp8 else PLAIN_DTYPES[src.fmt.name]
        t = new_table(lid, (slots[lid], src.fmt.values), dtype, placement, device, fp8, huge_pages)
        reader = open_reader(str(path), src, threads, file_io)
        if reader.row_bytes != t.row_bytes:
            raise ValueError(
                f"{src.key}: stored rows of {reader.row_bytes} bytes, cache rows of {t.row_bytes}"
            )
        tables[lid] = t
        layers[lid] = FileLayer(
            lid, src.rows, SlotCache(src.rows, slots[lid], directory), reader, t
        )
    return TableStore(tables, placement, huge_pages), FileTier(layers)


def table_bytes(path: str | Path, keys: dict[int, str]) -> dict[int, int]:
    """Each table's stored bytes, from the file's header (nothing read beyond it)."""
    header = read_header(path)
    return {lid: (s := table_source(header, k)).rows * s.row_bytes for lid, k in keys.items()}


def choose_tier(placement: str | None, sizes: dict[int, int], budget: int) -> tuple[bool, str]:
    """Whether the tables go to the file tier, and why (the start-up log's line)."""
    total = sum(sizes.values())
    each = ", ".join(f"layer {lid} {n / 2**20:.1f} MiB" for lid, n in sizes.items())
    if placement == "file":
        return True, f"--placement file: {each} stay in the file, DRAM cache {budget} bytes"
    if budget and total > budget:
        return True, (
            f"tables ({each}; {total} bytes) exceed --host-memory-bytes {budget}: file tier "
            "with a DRAM cache of that size"
        )
    limit = f"within --host-memory-bytes {budget}" if budget else "no --host-memory-bytes"
    return False, f"tables ({each}) loaded whole into the host tier ({limit})"
