"""Where Engram tables live: GPU-resident, pinned host memory (CUDA), or plain host memory.

Tables stream from their safetensors file straight into the chosen tier in bounded chunks
(``table_load``: read with ``preadv``, no mapping, page cache released behind each chunk), so
RAM never holds two full copies and host tiers never pass through the GPU. A truncated or
corrupt file is refused before anything is allocated (``models.safetensors_header.TableFileError``).

Row formats (``rowformat``): a table holds plain rows (bf16 as trained, or f16/f32) or packed
FP8 rows (uint8, values then scales). A checkpoint's tables load as stored, or are converted
while they stream in (``row_format``: 'fp8' quantises plain tables chunk by chunk, exactly as
``engram-quantize`` does; 'bf16'/'f16'/'f32' store plain rows). ``Table.decode`` turns gathered
rows into what the model reads: plain rows as they are, FP8 rows dequantised to ``row_dtype``.

Host memory comes from :class:`~offload.hostmem.HostBuffer`: 2 MiB pages where the OS allows
(hugetlbfs when reserved, else transparent huge pages), registered with CUDA (portable + mapped)
for the pinned host tier. ``huge_pages=False`` uses cudaHostAlloc for the host tier and plain
torch memory for the cpu tier. ``describe()`` says what the tables got.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import torch

from models.safetensors_header import read_header

from .hostmem import SMAPS, HostBuffer, PinnedBuffer, host_table_memory, huge_bytes_in, thp_mode
from .rowformat import FORMATS, PLAIN_DTYPES, RowFormat, dequantize_fp8
from .shared_load import load_shared
from .shared_tables import SharedBuffer, SharedTables
from .table_load import LoadStats, TableSource, load_tables, table_source

ROW_FORMATS = ("auto", *FORMATS)  # what a load may ask for; 'auto' keeps tables as stored


class Placement(str, enum.Enum):
    GPU = "gpu"  # resident in device memory (the baseline)
    HOST = "host"  # pinned (page-locked, device-mapped) host memory; needs CUDA
    CPU = "cpu"  # plain host memory; the tier where there is no CUDA

    @classmethod
    def parse(cls, value: str | Placement) -> Placement:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown placement {value!r}; use one of {', '.join(p.value for p in cls)}"
            ) from None


def cuda_ok() -> bool:
    return torch.cuda.is_available()


def cupy_ok() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return cuda_ok()


def check_placement(placement: Placement, device: torch.device) -> None:
    """ValueError, with the fix, when tables cannot live in ``placement`` for ``device``."""
    if placement is not Placement.CPU and device.type != "cuda":
        raise ValueError(
            f"placement {placement.value!r} needs a CUDA device (this run's device is "
            f"{device.type}); use placement 'cpu' here"
        )
    if placement is Placement.CPU and device.type == "cuda":
        raise ValueError(
            "placement 'cpu' serves a CPU device; on CUDA use 'host' (pinned) or 'gpu'"
        )
    if placement is Placement.HOST and not cupy_ok():
        raise ValueError("placement 'host' needs CuPy: pip install 'engram-serve[gpu]'")


@dataclass
class Table:
    layer_id: int
    tensor: torch.Tensor  # stored rows, where gathers read: [R, W], or uint8 [R, W + W/32] fp8
    placement: Placement
    memory: HostBuffer | PinnedBuffer | None = None  # host memory behind ``tensor`` if ours
    fmt: RowFormat | None = None  # None: plain rows of tensor.dtype (set when nameable)
    row_dtype: torch.dtype | None = None  # what rows come back as (fp8: dequantised to it)
    _device_view: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.fmt is None and self.tensor.dtype in PLAIN_DTYPES.values():
            self.fmt = RowFormat.plain(self.tensor.dtype, int(self.tensor.shape[1]))
        if self.row_dtype is None:
            self.row_dtype = torch.bfloat16 if self.fp8 else self.tensor.dtype

    @property
    def fp8(self) -> bool:
        return self.fmt is not None and self.fmt.name == "fp8"

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def width(self) -> int:
        """Values per row the model reads."""
        return self.fmt.values if self.fp8 else int(self.tensor.shape[1])

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row: what a gather moves."""
        return int(self.tensor.shape[1]) * self.tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Gathered stored rows -> the rows the model reads (on raw's device)."""
        return dequantize_fp8(raw, self.row_dtype) if self.fp8 else raw

    def device_view(self, device: torch.device) -> torch.Tensor:
        """The host table as a device-visible tensor (UVA zero-copy reads)."""
        mem = self.memory
        if isinstance(mem, HostBuffer) and mem.registered_device is not None:
            if self._device_view is None:
                shape = tuple(self.tensor.shape)
                self._device_view = mem.device_view(self.tensor.dtype, shape, device)
            return self._device_view
        if isinstance(mem, PinnedBuffer):
            if self._device_view is None:
                self._device_view = mem.device_view(device)
            return self._device_view
        raise RuntimeError(f"Engram layer {self.layer_id}: table is not in mapped pinned memory")


def new_table(
    layer_id: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    placement: Placement,
    device: torch.device,
    fp8: bool = False,
    huge_pages: bool = True,
) -> Table:
    """An empty table of ``shape`` = (rows, values per row). Plain: rows of ``dtype``. FP8:
    packed uint8 rows that gathers dequantise to ``dtype``."""
    fmt, stored = None, shape
    if fp8:
        fmt = RowFormat("fp8", shape[1])
        stored, dtype_stored = (shape[0], fmt.row_bytes), torch.uint8
    else:
        dtype_stored = dtype
    memory = None
    if placement is Placement.GPU:
        t = torch.empty(stored, dtype=dtype_stored, device=device)
    else:
        memory, t = host_table_memory(
            stored, dtype_stored, placement is Placement.HOST, device, huge_pages
        )
    return Table(layer_id, t, placement, memory, fmt, dtype if fp8 else None)


class TableStore:
    """The Engram tables of one model, all in one placement."""

    def __init__(
        self, tables: dict[int, Table], placement: Placement, huge_pages: bool = False
    ) -> None:
        self.tables, self.placement, self.huge_pages = tables, placement, huge_pages
        self.load_stats: LoadStats | None = None  # set when the tables streamed from a file

    def __getitem__(self, layer_id: int) -> Table:
        return self.tables[layer_id]

    def close(self) -> None:
        """Unregister the host tables from CUDA and drop the store's hold on their memory
        (idempotent); the tensors already handed out stay readable as host memory."""
        for t in self.tables.values():
            t._device_view = None
            if t.memory is not None:
                t.memory.close()

    def bytes_by_tier(self) -> dict[str, int]:
        out = {p.value: 0 for p in Placement}
        for t in self.tables.values():
            out[t.placement.value] += t.nbytes
        return out

    def describe(self) -> dict:
        """Row formats and the memory behind the tables (huge pages asked for and got)."""
        try:
            smaps = SMAPS.read_text()
        except OSError:
            smaps = ""
        kinds, formats, huge, registered = set(), set(), 0, []
        for t in self.tables.values():
            formats.add(t.fmt.name if t.fmt is not None else str(t.tensor.dtype))
            mem = t.memory
            if isinstance(mem, HostBuffer):
                kinds.add(mem.kind)
                huge += min(mem.nbytes, huge_bytes_in(smaps, mem.ptr, mem.ptr + mem.span))
                registered.append(mem.registered_device is not None)
            elif isinstance(mem, PinnedBuffer):
                kinds.add("cuda-pinned")
                registered.append(True)
            else:
                kinds.add("device" if t.placement is Placement.GPU else "plain")
        return {
            "placement": self.placement.value,
            "row_formats": sorted(formats),
            "memory": sorted(kinds),
            "huge_pages_requested": self.huge_pages,
            "thp_mode": thp_mode(),
            "bytes": sum(t.nbytes for t in self.tables.values()),
            "huge_bytes": huge,
            "registered": bool(registered) and all(registered),
            "shared": [
                {"layer": lid, **t.memory.placement(smaps)}
                for lid, t in self.tables.items()
                if isinstance(t.memory, SharedBuffer)
            ],
        }

    @classmethod
    def from_model(cls, model) -> TableStore:
        """A store over a loaded model's own tables (no copy), on the model's device: the
        resident baseline for a model whose tables were loaded with it."""
        tables = {}
        for lid in model.config.engram_layer_ids:
            t = model.engram_table(lid).detach()
            placement = Placement.GPU if t.device.type == "cuda" else Placement.CPU
            tables[lid] = Table(lid, t, placement)
        return cls(tables, placement if tables else Placement.CPU)

    @classmethod
    def allocate(
        cls,
        shapes: dict[int, tuple[int, int]],
        dtype: torch.dtype,
        placement: Placement | str,
        device: torch.device | str = "cpu",
        fp8: bool = False,
        huge_pages: bool = True,
    ) -> TableStore:
        """Empty tables of ``shapes`` (rows, values per row); see :func:`new_table`."""
        placement = Placement.parse(placement)
        device = torch.device(device)
        check_placement(placement, device)
        tables = {
            lid: new_table(lid, tuple(shape), dtype, placement, device, fp8, huge_pages)
            for lid, shape in shapes.items()
        }
        return cls(tables, placement, huge_pages)

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        keys: dict[int, str],
        placement: Placement | str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        chunk_rows: int = 1 << 16,
        progress: bool = True,
        row_format: str = "auto",
        row_dtype: torch.dtype = torch.bfloat16,
        huge_pages: bool = True,
        shared: SharedTables | None = None,
    ) -> TableStore:
        """Stream each table (``{layer: tensor name}``) from the file into its tier.

        ``row_format``: 'auto' keeps each table as stored (plain rows in ``dtype`` when given);
        'fp8' quantises plain tables while loading; 'bf16', 'f16', 'f32' store plain rows of
        that dtype (fp8 tables dequantised while loading). ``row_dtype``: what gathers
        dequantise fp8 rows to (the model's dtype). ``shared``: host tables in shared memory
        on the node, attached when another engine loaded them (``offload.shared_tables``).
        """
        if row_format not in ROW_FORMATS:
            raise ValueError(
                f"unknown row format {row_format!r}; use one of {', '.join(ROW_FORMATS)}"
            )
        placement = Placement.parse(placement)
        device = torch.device(device)
        check_placement(placement, device)
        header = read_header(path)
        tables: dict[int, Table] = {}
        sources: dict[int, TableSource] = {}
        plans: dict[int, tuple[TableSource, torch.dtype, bool]] = {}
        for lid, key in keys.items():
            src = table_source(header, key)
            fp8 = row_format == "fp8" or (row_format == "auto" and src.fmt.name == "fp8")
            if fp8 and src.fmt.name != "fp8":
                try:
                    RowFormat("fp8", src.fmt.values)
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
            out = row_dtype if fp8 else PLAIN_DTYPES.get(row_format, dtype)
            if out is None:  # auto, plain as stored
                out = PLAIN_DTYPES.get(src.fmt.name, row_dtype)
            sources[lid] = src
            plans[lid] = (src, out, fp8)
        if shared is not None and placement is not Placement.GPU:
            tables, stats = load_shared(
                shared, path, plans, placement, device, chunk_rows, progress
            )
            store = cls(tables, placement, huge_pages)
            store.load_stats = stats
            return store
        for lid, (src, out, fp8) in plans.items():
            tables[lid] = new_table(
                lid, (src.rows, src.fmt.values), out, placement, device, fp8, huge_pages
            )
        store = cls(tables, placement, huge_pages)
        store.load_stats = load_tables(str(path), sources, tables, chunk_rows, progress=progress)
        return store

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        layer_ids: list[int],
        placement: Placement | str,
        device: torch.device | str = "cpu",
        progress: bool = True,
        row_format: str = "auto",
        row_dtype: torch.dtype = torch.bfloat16,
        huge_pages: bool = True,
        shared: SharedTables | None = None,
    ) -> TableStore:
        """The Engram tables of a checkpoint directory: its engram.safetensors, or the weight
        files that hold them (TinyEngram), each streamed from its file into the tier."""
        from models.checkpoint import table_files

        store = cls({}, Placement.parse(placement), huge_pages)
        for path, keys in table_files(model_dir, layer_ids).items():
            part = cls.from_safetensors(
                path,
                keys,
                placement,
                device,
                progress=progress,
                row_format=row_format,
                row_dtype=row_dtype,
                huge_pages=huge_pages,
                shared=shared,
            )
            store.tables.update(part.tables)
            if part.load_stats is not None:  # every file's bytes and seconds, summed
                was = store.load_stats or LoadStats(0, 0.0)
                stats = part.load_stats
                store.load_stats = LoadStats(was.bytes + stats.bytes, was.seconds + stats.seconds)
        missing = [lid for lid in layer_ids if lid not in store.tables]
        if missing:
            raise ValueError(f"{model_dir}: no Engram table for layer(s) {missing}")
        store.tables = {lid: store.tables[lid] for lid in layer_ids}
        return store
