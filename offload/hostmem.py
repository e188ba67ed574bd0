"""Host memory for Engram tables, backed by huge pages where the OS allows, registered with CUDA.

``HostBuffer(nbytes)`` maps anonymous memory and, with ``huge_pages=True``, backs it with 2 MiB
pages: reserved hugetlbfs pages when enough are free (MAP_HUGETLB), else transparent huge pages
(MADV_HUGEPAGE on a 2 MiB-aligned range, honoured when the THP mode is 'always' or 'madvise').
Every page is touched at allocation so it faults in now, as a huge page when it can.
``describe()`` says what was used and how many bytes really are in huge pages (/proc/self/smaps),
for the benchmark report. ``register()`` page-locks the range and maps it for the device
(cudaHostRegister, portable + mapped) so a kernel can read it over PCIe (UVA).

Lifetime: the mapping lives as long as anything that views it: the buffer itself, the host
tensors from ``tensor`` / ``view()``, and device views (which hold the buffer). ``close()``
unregisters from CUDA (no device work may still read it) and drops the buffer's own reference;
the memory is unmapped when the last host view is gone. An unclosed buffer unregisters when it
is garbage-collected, which cannot happen while a device view exists.
"""

from __future__ import annotations

import logging
import mmap
import re
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MEMINFO = Path("/proc/meminfo")
SMAPS = Path("/proc/self/smaps")
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)  # Linux value; Python < 3.12 lacks it
CUDA_HOST_REGISTER_PORTABLE = 1
CUDA_HOST_REGISTER_MAPPED = 2
_HUGE_FIELDS = (
    "AnonHugePages:",
    "ShmemPmdMapped:",  # a shared tmpfs/memfd mapping's THP
    "FilePmdMapped:",
    "Private_Hugetlb:",
    "Shared_Hugetlb:",
)


def thp_mode(path: Path = THP_ENABLED) -> str:
    """The bracketed THP mode ('always', 'madvise', 'never'), or 'unavailable'."""
    try:
        m = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return "unavailable"
    return m.group(1) if m else "unavailable"


def hugetlb_free_bytes(path: Path = MEMINFO) -> int:
    """Free reserved hugetlbfs pages of the default size, in bytes (0 when none or unknown)."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    free = re.search(r"^HugePages_Free:\s+(\d+)", text, re.M)
    size = re.search(r"^Hugepagesize:\s+(\d+) kB", text, re.M)
    if not free or not size or int(size.group(1)) * 1024 != HUGE_PAGE:
        return 0
    return int(free.group(1)) * HUGE_PAGE


def huge_bytes_in(text: str, start: int, end: int) -> int:
    """Bytes in huge pages (THP or hugetlbfs) of the smaps mappings overlapping [start, end).
    A mapping the kernel merged with a neighbour counts whole, so cap it at the range."""
    total, inside = 0, False
    for line in text.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) < end and int(head.group(2), 16) > start
        elif inside and line.startswith(_HUGE_FIELDS):
            total += int(line.split()[1]) * 1024
    return min(total, end - start)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _unregister(ptr: int) -> None:
    import cupy

    cupy.cuda.runtime.hostUnregister(ptr)


class HostBuffer:
    """``nbytes`` of page-aligned host memory; ``tensor`` is a uint8 CPU view of exactly
    ``nbytes``. ``kind`` is 'hugetlb', 'thp' or 'none'."""

    def __init__(self, nbytes: int, huge_pages: bool = True, fill: int | None = 0) -> None:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.nbytes, self.huge_pages = nbytes, huge_pages
        self.thp_mode = thp_mode()
        self.kind, self._mm, offset = "none", None, 0
        size = _round_up(max(nbytes, 1), HUGE_PAGE if huge_pages else mmap.PAGESIZE)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if huge_pages and hugetlb_free_bytes() >= size:
            try:  # private hugetlb mappings reserve their pages here, so faults cannot fail
                self._mm = mmap.mmap(-1, size, flags=flags | MAP_HUGETLB, prot=prot)
                self.kind = "hugetlb"
            except OSError:
                self._mm = None
        if self._mm is None:
            slack = HUGE_PAGE if huge_pages else 0  # room to align the range to 2 MiB
            self._mm = mmap.mmap(-1, size + slack, flags=flags, prot=prot)
        if self.kind == "none" and huge_pages:
            offset = -torch.frombuffer(self._mm, dtype=torch.uint8).data_ptr() % HUGE_PAGE
            if self.thp_mode in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    self._mm.madvise(mmap.MADV_HUGEPAGE, offset, size)
                    self.kind = "thp"
                except OSError:  # a kernel without THP support: plain pages
                    pass
        self.span = size  # bytes of the aligned range (what register() pins)
        # A tensor whose storage starts at the aligned range (and holds the mapping alive), not
        # a view into the whole mapping: torch's is_pinned() asks CUDA about the storage's base
        # address, and only the aligned range is registered (the mapping's base is not 2 MiB
        # aligned on kernels before 6.7).
        self._range = torch.frombuffer(self._mm, dtype=torch.uint8, offset=offset, count=size)
        self.tensor = self._range[:nbytes]
        self.ptr = self._range.data_ptr()
        if fill is not None:
            self._range.fill_(fill)  # fault every page in now
        self.registered_device: int | None = None
        self._finalizer: weakref.finalize | None = None

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A CPU tensor over the start of the buffer (no copy)."""
        if self.tensor is None:
            raise RuntimeError("the buffer is closed; keep views from before close() instead")
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= d
        if n > self.nbytes:
            raise ValueError(
                f"{tuple(shape)} {dtype} needs {n} bytes; the buffer has {self.nbytes}"
            )
        return self.tensor[:n].view(dtype).view(shape)

    def huge_bytes(self) -> int:
        """Bytes of this buffer in huge pages now (0 where smaps is unreadable)."""
        try:
            text = SMAPS.read_text()
        except OSError:
            return 0
        return huge_bytes_in(text, self.ptr, self.ptr + self.span)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "huge_pages_requested": self.huge_pages,
            "thp_mode": self.thp_mode,
            "bytes": self.nbytes,
            "huge_bytes": self.huge_bytes(),
            "registered": self.registered_device is not None,
        }

    def register(self, device: torch.device | str | int = "cuda") -> None:
        """Page-lock the buffer and map it for the device (portable + mapped). Needs CuPy."""
        if self.registered_device is not None:
            return
        try:
            import cupy
        except ImportError:
            raise RuntimeError(
                "registering host memory needs CuPy: pip install 'engram-serve[gpu]'"
            ) from None
        if not torch.cuda.is_available():
            raise RuntimeError("registering host memory needs CUDA; use the buffer as host memory")
        dev = cuda_index(device)
        rt = cupy.cuda.runtime
        with cupy.cuda.Device(dev):
            rt.hostRegister(
                self.ptr, self.span, CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_MAPPED
            )
        self.registered_device = dev
        self._finalizer = weakref.finalize(self, _unregister, self.ptr)
        self._finalizer.atexit = False  # at exit the process's registrations go with it

    def device_pointer(self, device: torch.device | str | int = "cuda") -> int:
        import cupy

        if self.registered_device is None:
            raise RuntimeError("the buffer is not registered with CUDA; call register() first")
        with cupy.cuda.Device(cuda_index(device)):
            return int(cupy.cuda.runtime.pointerGetAttributes(self.ptr).devicePointer)

    def device_view(
        self, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device | str | int = "cuda"
    ) -> torch.Tensor:
        """A CUDA tensor over the registered buffer (zero-copy reads over PCIe)."""

        host = self.view(dtype, shape)  # checks the size
        dev = cuda_index(device)
        nbytes = host.numel() * host.element_size()
        return mapped_tensor(self.device_pointer(dev), nbytes, self, dev).view(dtype).view(shape)

    def close(self) -> None:
        """Unregister from CUDA and drop this buffer's reference to the memory (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.registered_device = None
        self._range = self.tensor = self._mm = None


def cuda_index(device: torch.device | str | int) -> int:
    """The CUDA ordinal of ``device`` ("cuda" alone means the current device)."""
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"mapped host memory needs a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def mapped_tensor(dptr: int, nbytes: int, owner, dev: int) -> torch.Tensor:
    """A CUDA uint8 tensor over ``nbytes`` of mapped host memory at device pointer ``dptr``,
    keeping ``owner`` alive; refuses (never fills GPU memory) if torch would copy."""
    import cupy

    with cupy.cuda.Device(dev):
        mem = cupy.cuda.UnownedMemory(dptr, max(nbytes, 1), owner, dev)
        arr = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
        flat = torch.as_tensor(arr, device=torch.device("cuda", dev))
    if nbytes and flat.data_ptr() != dptr:
        raise RuntimeError(
            f"mapped host memory could not be viewed on cuda:{dev} without a copy; "
            "use --gather staged"
        )
    return flat


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
        self.device_index = cuda_index(device)
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
        n = self.host.numel() * self.host.element_size()
        return mapped_tensor(dptr, n, self, dev).view(self.dtype).view(self.shape)

    def close(self) -> None:
        """Drop this buffer's hold on the pinned allocation (idempotent): CUDA frees it once
        the last tensor over it goes."""
        self._mem = self.host = None

    def describe(self) -> dict:
        return {"kind": "cuda-pinned", "bytes": self.nbytes, "huge_bytes": 0, "registered": True}


def host_table_memory(
    shape: tuple[int, int], dtype: torch.dtype, mapped: bool, device, huge_pages: bool
) -> tuple[HostBuffer | PinnedBuffer | None, torch.Tensor]:
    """Memory for one host-side table and the tensor over it; ``mapped``: page-locked and
    device-visible (the pinned host tier), else plain host memory (the cpu tier)."""
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if not mapped:
        if not huge_pages:
            return None, torch.empty(shape, dtype=dtype)
        buf = HostBuffer(nbytes, huge_pages=True)
        return buf, buf.view(dtype, shape)
    if huge_pages:
        buf = HostBuffer(nbytes, huge_pages=True)
        try:
            buf.register(device)
            return buf, buf.view(dtype, shape)
        except Exception as e:  # keep serving: the page-locked allocation CUDA gives us
            log.warning(
                "registering huge-page table memory with CUDA failed (%s); using "
                "cudaHostAlloc instead",
                e,
            )
            buf.close()
    pinned = PinnedBuffer(shape, dtype, device)
    return pinned, pinned.host
