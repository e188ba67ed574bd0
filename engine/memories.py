"""Engram memories on one backbone: which memory each sequence reads, and their lifetimes.

A :class:`Memory` is the Engram layers of one checkpoint of the served base: its modules
(gate, projections, conv; on the device while in use) and its tables in the served tiers with
their own gather path and accountant. The served model's own Engram layers are the base
memory. A sequence takes the current version of its memory when it is added and keeps it to
its end, so a reload (a new version installed beside the old) never changes a running
sequence; a retired version is freed once no sequence holds it and no step in flight can read
it.

``max_on_device`` (``--max-memories``) bounds how many memories besides the base have their
modules on the device: the scheduler admits no sequence of a memory past it while as many
others run, and a memory whose sequences are all gone may move back to host memory, least
recently used first (as ``--max-loras`` / ``--max-cpu-loras`` do for adapters).

    memories = MemorySet(base)               the engine's (ModelRunner.memories)
    memories.install(memory)                 engine thread, between steps
    seq.memory = memories.acquire(name)      Engine.add
    memories.release(seq.memory)             Engine.finish
    groups = memories.groups(seqs, lengths)  ModelRunner.prepare: token rows per memory
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import is_tinyengram, load_checkpoint
from models.engram import Engram
from models.memory import check_backbone, check_layout
from offload.offloaded_model import OffloadedModel
from offload.prefetch import Prefetcher

log = logging.getLogger("engram.memories")


class BadMemory(ValueError):
    """A memory request that cannot be honoured (missing files, a base mismatch, a name in
    use, a corrupt table, an unknown name): the message names it; nothing changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Memory:
    name: str
    version: int
    engrams: dict[int, Engram]  # Engram layer -> module (tables live in ``rows``' store)
    rows: Prefetcher  # its tables' tier and gather path, with its own accountant
    path: str = ""
    format: str = "engram-serve"  # or "tinyengram"
    offload: OffloadedModel | None = None  # its tables (None: the served model's own)
    base: bool = False
    plain: bool = False  # no Engram layers: its tokens skip them (a base without any)
    active: int = 0  # sequences holding this version
    retired: bool = False
    on_device: bool = True
    last_used: int = 0  # the step that last read it (LRU)

    def module_bytes(self) -> int:
        params = [p for m in self.engrams.values() for p in m.parameters() if not p.is_meta]
        return sum(p.numel() * p.element_size() for p in params)

    def tier_bytes(self) -> dict[str, int]:
        return self.offload.tier_bytes() if self.offload is not None else {}

    def describe(self) -> dict:
        store = self.rows.store
        return {
            "name": self.name,
            "version": self.version,
            "path": self.path,
            "format": self.format,
            "base": self.base,
            "active_sequences": self.active,
            "retired": self.retired,
            "modules_on_device": self.on_device,
            "module_bytes": self.module_bytes(),
            "placement": store.placement.value,
            "gather": self.rows.name,
            "table_bytes": self.tier_bytes() or store.bytes_by_tier(),
            "file_tier": self.offload is not None and self.offload.file_tier is not None,
            "accounting": self.rows.accountant.summary(),
        }

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()


@dataclass
class StepGroup:
    """One memory's part of a step: its sequences (positions in the step) and their tokens
    (rows of the packed step)."""

    memory: Memory
    seqs: np.ndarray
    tokens: np.ndarray


class MemorySet:
    def __init__(self, base: Memory, device: torch.device, max_on_device: int = 0) -> None:
        self.base, self.device, self.max_on_device = base, torch.device(device), max_on_device
        self.current: dict[str, Memory] = {}  # name -> the version new sequences get
        self.retired: list[Memory] = []  # replaced or unloaded, still held by a sequence
        self.freeing: list[tuple[int, Memory]] = []  # (step it became free, memory)
        self.step = 0
        self.evictions = 0  # memories moved back to host memory (LRU)
        # memories (not the base) the last prepared step reads: with overlap it may still
        # run, so they stay on the device and count against max_on_device for admission
        self.previous: set[Memory] = set()
        self._current: set[Memory] = set()
        self._lock = threading.Lock()  # HTTP threads read, the engine thread writes

    # --- names (any thread) -----------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self.current)

    def snapshot(self) -> list[Memory]:
        with self._lock:
            return [self.base, *self.current.values(), *self.retired]

    # --- engine thread ----------------------------------------------------------------
    def install(self, memory: Memory) -> Memory | None:
        """``memory`` serves its name from the next sequence added; the version it replaces
        (if any) retires and is freed after its last sequence."""
        with self._lock:
            old = self.current.get(memory.name)
            self.current[memory.name] = memory
        if old is not None:
            self._retire(old)
        return old

    def remove(self, name: str) -> Memory:
        with self._lock:
            old = self.current.pop(name, None)
        if old is None:
            raise BadMemory(f"no memory named {name!r} is loaded", 404)
        self._retire(old)
        return old

    def _retire(self, memory: Memory) -> None:
        memory.retired = True
        with self._lock:
            self.retired.append(memory)
        if memory.active == 0:
            self.freeing.append((self.step, memory))

    def acquire(self, name: str | None) -> Memory:
        if name is None:
            memory = self.base
        else:
            with self._lock:
                memory = self.current.get(name)
            if memory is None:
                raise BadMemory(f"no memory named {name!r} is loaded", 404)
        memory.active += 1
        return memory

    def release(self, memory: Memory | None) -> None:
        if memory is None:
            return
        memory.active -= 1
        if memory.active == 0 and memory.retired:
            self.freeing.append((self.step, memory))

    def collect(self, idle: bool = False) -> list[Memory]:
        """Free retired memories no step can read any more: two steps after their last
        sequence ended (a step may still be in flight with it), or now when ``idle``."""
        keep, freed = [], []
        for at, m in self.freeing:
            (freed if idle or self.step >= at + 2 else keep).append((at, m))
        self.freeing = keep
        for _, m in freed:
            with self._lock:
                if m in self.retired:
                    self.retired.remove(m)
            m.close()
            log.info("memory %s version %d freed", m.name, m.version)
        return [m for _, m in freed]

    def _to_host(self, memory: Memory) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no queued kernel still reads its weights
        for m in memory.engrams.values():
            m.to("cpu")
        memory.on_device = False

    def make_resident(self, memory: Memory) -> None:
        """Bring ``memory``'s modules to the device, moving least recently used ones that
        neither this step nor the one in flight reads back to host memory, to stay within
        ``max_on_device``."""
        if memory.on_device or memory.base:
            return
        if self.max_on_device:
            with self._lock:
                live = [*self.current.values(), *self.retired]
            busy = self.previous | self._current
            idle = sorted(
                (m for m in live if m.on_device and m not in busy), key=lambda m: m.last_used
            )
            over = sum(m.on_device for m in live) + 1 - self.max_on_device
            for m in idle[: max(0, over)]:
                self._to_host(m)
                self.evictions += 1
        for m in memory.engrams.values():
            m.to(self.device)
        memory.on_device = True

    def groups(self, seqs, lengths: np.ndarray) -> list[StepGroup] | None:
        """Each memory's sequences and token rows in a step; None when every sequence reads
        the base memory (the step runs as without memories)."""
        self.step += 1
        # no memory besides the base loaded or still held (retired ones stay listed until
        # freed): every sequence reads the base, without a pass over the step's sequences
        if (not self.current and not self.retired) or all(
            m is None or m.base
            for m in {s.memory for s in seqs}  # the distinct ones
        ):
            self.base.last_used = self.step
            self.previous = set()
            return [] if self.base.plain else None
        mems = [s.memory for s in seqs]
        by: dict[Memory, list[int]] = {}
        for i, m in enumerate(mems):
            by.setdefault(m or self.base, []).append(i)
        starts = np.cumsum(lengths) - lengths
        out = []
        self._current = {m for m in by if not m.base}
        for m in by:
            m.last_used = self.step
        for m, idx in by.items():
            self.make_resident(m)
            at = np.array(idx, np.int64)
            if len(by) == 1:
                tokens = np.arange(int(lengths.sum()))
            else:
                tokens = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in idx])
            out.append(StepGroup(m, at, tokens))
        self.previous, self._current = self._current, set()
        return out

    def plain_base(self, name: str, path: str, fmt: str) -> None:
        """The served model's Engram layers are a memory's (``name``), the base has none:
        a base-name request runs the backbone alone (engram-serve loads the first memory of
        a base without Engram layers as the served model)."""
        served = self.base
        served.name, served.path, served.format, served.base = name, path, fmt, False
        with self._lock:
            self.current[name] = served
        self.base = Memory("", 1, {}, served.rows, base=True, plain=True)

    def idle(self) -> None:
        """No step is in flight: the last one's memories may move out too."""
        self.previous = set()

    def bytes_held(self) -> dict[str, int]:
        """Table bytes per tier and module bytes of every memory but the base (what loads
        add and unloads give back)."""
        out: dict[str, int] = {}
        with self._lock:
            live = [*self.current.values(), *self.retired]
        for m in live:
            for tier, n in m.tier_bytes().items():
                out[tier] = out.get(tier, 0) + n
            out["modules"] = out.get("modules", 0) + m.module_bytes()
        return out


@dataclass
class MemoryLoader:
    """Loads memories beside a served model: the checks of models/memory.py, the modules on
    the CPU (then the device), the tables into the served tiers by ``place_tables`` (the
    server's OffloadedModel.load settings). Runs off the step thread."""

    served: OffloadedModel
    place_tables: Callable[..., OffloadedModel]  # (dir, loaded=(model, tok)) -> OffloadedModel
    versions: dict[str, int] = field(default_factory=dict)

    def load(self, name: str, path: str | Path) -> Memory:
        """The memory at ``path``, its modules in host memory until a step needs them."""
        d = Path(path)
        if not d.is_dir():
            raise BadMemory(f"memory {name!r}: directory {path} does not exist")
        base = self.served.model
        dtype = base.lm_head.weight.dtype
        try:
            model, tok = load_checkpoint(d, dtype=dtype, device="cpu", load_tables=False)
            check_backbone(base, model, name)
            check_layout(base, model, name)
            offload = self.place_tables(d, loaded=(model, tok))
        except BadMemory:
            raise
        except (ValueError, OSError) as e:  # missing files, mismatches, corrupt tables
            raise BadMemory(str(e) if name in str(e) else f"memory {name!r}: {e}") from e
        engrams = model.engram_layers()
        for m in engrams.values():
            m.multi_head_embedding = None  # its table lives in the tiers, not the module
        offload.model = base  # the memory's own copy of the backbone is dropped (it matched)
        self.versions[name] = self.versions.get(name, 0) + 1
        return Memory(
            name,
            self.versions[name],
            engrams,
            offload.prefetcher,
            str(d),
            memory_format(d),
            offload,
            on_device=False,
        )


def base_memory(name: str, model, rows: Prefetcher) -> Memory:
    """The served model's own Engram layers as a memory (never unloaded)."""
    return Memory(name, 1, model.engram_layers(), rows, base=True)


def memory_format(path: str | Path) -> str:
    """The checkpoint format of a memory's directory, as /v1/memories reports it."""
    return "tinyengram" if is_tinyengram(Path(path)) else "engram-serve"
