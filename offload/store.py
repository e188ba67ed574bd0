"""Where Engram tables live: GPU-resident, pinned host memory (CUDA), or plain host memory.

Tables stream from their safetensors file straight into the chosen tier in chunks: the file is
memory-mapped, one chunk at a time is converted and copied into the final buffer, so RAM never
holds two full copies and host tiers never pass through the GPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm


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


class PinnedBuffer:
    """Page-locked host memory from CuPy, mapped into the device address space.

    ``host`` is a CPU torch tensor over the buffer (no copy); ``device_view()`` is a CUDA
    tensor over the same bytes, so a device kernel reads rows straight over PCIe (UVA).
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cuda"
    ) -> None:
        import cupy
        import numpy as np

        self.shape, self.dtype = tuple(shape), dtype
        self.device_index = cuda_index(torch.device(device))
        n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        self.nbytes = max(1, n)
        rt = cupy.cuda.runtime
        # Mapped + portable: device-visible from every context (zero-copy reads). Allocated
        # under the target device so pointer attributes (and torch's view) name that device.
        with cupy.cuda.Device(self.device_index):
            self._mem = cupy.cuda.PinnedMemory(
                self.nbytes, rt.hostAllocMapped | rt.hostAllocPortable
            )
        self.ptr = int(self._mem.ptr)
        # PinnedMemoryPointer exports the buffer protocol and holds ``_mem``: the numpy array
        # (and the torch tensor over it) keep the pinned allocation alive.
        raw = np.frombuffer(cupy.cuda.PinnedMemoryPointer(self._mem, 0), np.uint8, count=n)
        self.host = torch.from_numpy(raw).view(dtype).view(self.shape)

    def device_view(self, device: torch.device) -> torch.Tensor:
        import cupy

        dev = cuda_index(device)
        with cupy.cuda.Device(dev):
            # With unified addressing the device pointer equals the host pointer; ask anyway.
            dptr = int(cupy.cuda.runtime.pointerGetAttributes(self.ptr).devicePointer)
            mem = cupy.cuda.UnownedMemory(dptr, self.nbytes, self, dev)
            arr = cupy.ndarray((self.nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
            flat = torch.as_tensor(arr, device=torch.device("cuda", dev))
        if flat.data_ptr() != dptr:  # torch copied instead of viewing: refuse, never fill GPU
            raise RuntimeError(
                f"mapped host table could not be viewed on cuda:{dev} without a copy; "
                "use --gather staged"
            )
        n = self.host.numel() * self.host.element_size()
        return flat[:n].view(self.dtype).view(self.shape)


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


def cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device`` ("cuda" alone means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass
class Table:
    layer_id: int
    tensor: torch.Tensor  # where gathers read from: device tensor (gpu) or host tensor
    placement: Placement
    pinned: PinnedBuffer | None = None  # set for the host tier
    _device_view: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def row_bytes(self) -> int:
        return int(self.tensor.shape[1]) * self.tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def device_view(self, device: torch.device) -> torch.Tensor:
        """The host table as a device-visible tensor (UVA zero-copy reads)."""
        if self.pinned is None:
            raise RuntimeError(
                f"Engram layer {self.layer_id}: table is not in mapped pinned memory"
            )
        if self._device_view is None:
            self._device_view = self.pinned.device_view(device)
        return self._device_view


class TableStore:
    """The Engram tables of one model, all in one placement."""

    def __init__(self, tables: dict[int, Table], placement: Placement) -> None:
        self.tables, self.placement = tables, placement

    def __getitem__(self, layer_id: int) -> Table:
        return self.tables[layer_id]

    def bytes_by_tier(self) -> dict[str, int]:
        out = {p.value: 0 for p in Placement}
        for t in self.tables.values():
            out[t.placement.value] += t.nbytes
        return out

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
    ) -> TableStore:
        placement = Placement.parse(placement)
        device = torch.device(device)
        check_placement(placement, device)
        tables = {}
        for lid, shape in shapes.items():
            pinned = None
            if placement is Placement.GPU:
                t = torch.empty(shape, dtype=dtype, device=device)
            elif placement is Placement.HOST:
                pinned = PinnedBuffer(shape, dtype, device)
                t = pinned.host
            else:
                t = torch.empty(shape, dtype=dtype)
            tables[lid] = Table(lid, t, placement, pinned)
        return cls(tables, placement)

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
    ) -> TableStore:
        """Stream each table (``{layer: tensor name}``) from the file into its tier."""
        with safe_open(str(path), framework="pt") as f:
            slices = {lid: f.get_slice(key) for lid, key in keys.items()}
            shapes = {}
            for lid, sl in slices.items():
                shape = sl.get_shape()
                if len(shape) != 2:
                    raise ValueError(f"{keys[lid]} in {path}: want 2-D rows x width, got {shape}")
                shapes[lid] = (shape[0], shape[1])
            if dtype is None:  # as stored
                dtype = next(iter(slices.values()))[0:1].dtype
            store = cls.allocate(shapes, dtype, placement, device)
            total = sum(r for r, _ in shapes.values())
            with tqdm(
                total=total,
                desc="loading Engram tables",
                unit="row",
                unit_scale=True,
                disable=not progress,
            ) as bar:
                for lid, sl in slices.items():
                    dst = store[lid].tensor
                    for a in range(0, shapes[lid][0], chunk_rows):
                        chunk = sl[a : a + chunk_rows]
                        dst[a : a + chunk.shape[0]].copy_(chunk.to(dtype))
                        bar.update(chunk.shape[0])
        return store

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        layer_ids: list[int],
        placement: Placement | str,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> TableStore:
        """The Engram tables of a checkpoint directory (its engram.safetensors)."""
        from models.checkpoint import ENGRAM_FILE, table_key

        keys = {lid: table_key(lid) for lid in layer_ids}
        path = Path(model_dir) / ENGRAM_FILE
        return cls.from_safetensors(path, keys, placement, device, progress=progress)
