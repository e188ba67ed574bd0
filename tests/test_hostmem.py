"""Huge-page host buffers (offload.hostmem); registration with CUDA in the gpu tests."""

import gc
import os

import numpy as np
import pytest
import torch

from offload.hostmem import (
    HUGE_PAGE,
    HostBuffer,
    huge_bytes_in,
    hugetlb_free_bytes,
    thp_mode,
)
from offload.store import cupy_ok


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert thp_mode(p) == "madvise"
    p.write_text("[always] madvise never\n")
    assert thp_mode(p) == "always"
    assert thp_mode(tmp_path / "missing") == "unavailable"


def test_hugetlb_free_bytes_reads_meminfo(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal: 1 kB\nHugePages_Free:       3\nHugepagesize:       2048 kB\n")
    assert hugetlb_free_bytes(p) == 3 * HUGE_PAGE
    p.write_text("HugePages_Free:       3\nHugepagesize:    1048576 kB\n")  # 1 GiB pages
    assert hugetlb_free_bytes(p) == 0
    assert hugetlb_free_bytes(tmp_path / "missing") == 0


def test_huge_bytes_counts_only_mappings_in_range():
    text = "\n".join(
        [
            "7f0000000000-7f0000400000 rw-p 00000000 00:00 0",
            "AnonHugePages:      4096 kB",
            "7f0000400000-7f0000600000 rw-p 00000000 00:00 0",
            "AnonHugePages:      2048 kB",
            "Private_Hugetlb:       0 kB",
            "7f0000600000-7f0000800000 rw-p 00000000 00:00 0",
            "AnonHugePages:      2048 kB",
        ]
    )
    start = 0x7F0000000000
    assert huge_bytes_in(text, start, start + 0x600000) == 6 * 1024 * 1024
    assert huge_bytes_in(text, start + 0x400000, start + 0x500000) == 0x100000  # capped
    assert huge_bytes_in(text, 0, 0x1000) == 0


@pytest.mark.parametrize("huge", [True, False])
def test_host_buffer_is_zeroed_aligned_and_described(huge):
    n = 3 * HUGE_PAGE + 5
    buf = HostBuffer(n, huge_pages=huge)
    assert buf.tensor.shape == (n,) and buf.tensor.dtype == torch.uint8
    assert not buf.tensor.any()
    d = buf.describe()
    assert d["bytes"] == n and d["huge_pages_requested"] is huge and d["registered"] is False
    assert d["thp_mode"] == thp_mode()
    if not huge:
        assert buf.kind == "none" and buf.ptr % os.sysconf("SC_PAGE_SIZE") == 0
    else:
        assert buf.kind in ("thp", "hugetlb", "none")
        if thp_mode() in ("always", "madvise") and hugetlb_free_bytes() < buf.span:
            assert buf.kind == "thp"
        if buf.kind != "none":
            assert buf.ptr % HUGE_PAGE == 0 and buf.span % HUGE_PAGE == 0
            assert 0 <= d["huge_bytes"] <= buf.span and d["huge_bytes"] % HUGE_PAGE == 0
    buf.close()


@pytest.mark.parametrize("huge", [True, False])
def test_tensor_storage_is_exactly_the_range_that_register_pins(huge):
    """torch's is_pinned() asks CUDA about a tensor's storage base, so the storage must start
    where the registered (2 MiB-aligned) range starts: a view into a larger mapping whose base
    is not aligned reports is_pinned() == False on a registered buffer."""
    buf = HostBuffer(3 * HUGE_PAGE + 5, huge_pages=huge)
    for t in (buf.tensor, buf.view(torch.bfloat16, (8, 4))):
        storage = t.untyped_storage()
        assert storage.data_ptr() == buf.ptr
        assert storage.nbytes() == buf.span
    buf.close()


def test_views_write_through_and_outlive_close():
    buf = HostBuffer(1 << 20, huge_pages=False)
    table = buf.view(torch.bfloat16, (1024, 256))
    table.copy_(torch.arange(1024 * 256, dtype=torch.float32).view(1024, 256) % 200)
    assert buf.tensor[:2].tolist() == [0, 0] and buf.tensor[2:4].view(torch.bfloat16).item() == 1
    with pytest.raises(ValueError, match="needs 2097152 bytes; the buffer has 1048576"):
        buf.view(torch.float32, (1024, 512))
    buf.close()
    with pytest.raises(RuntimeError, match="closed"):
        buf.view(torch.uint8, (4,))
    del buf
    gc.collect()
    assert table[1023, 255].item() == (1024 * 256 - 1) % 200  # the view kept the mapping alive


def test_empty_buffer_and_no_fill():
    assert HostBuffer(0, huge_pages=False).tensor.numel() == 0
    buf = HostBuffer(4096, huge_pages=False, fill=None)
    buf.tensor[:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert buf.tensor[:3].tolist() == [1, 2, 3]


@pytest.mark.skipif(cupy_ok(), reason="checks the message where CUDA or CuPy is missing")
def test_register_without_cuda_says_what_is_missing():
    buf = HostBuffer(4096, huge_pages=False)
    with pytest.raises(RuntimeError, match="needs (CuPy|CUDA)"):
        buf.register()


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")
@pytest.mark.parametrize("huge", [True, False])
def test_gpu_registered_buffer_reads_back_on_the_device(huge):
    from offload.uva_kernel import gather_rows

    buf = HostBuffer(4 * HUGE_PAGE, huge_pages=huge)
    host = buf.view(torch.bfloat16, (4096, 1024))
    host.copy_(torch.randn(4096, 1024).to(torch.bfloat16))
    buf.register()
    assert buf.describe()["registered"] and host.is_pinned()
    view = buf.device_view(torch.bfloat16, (4096, 1024))
    assert view.is_cuda and view.data_ptr() == buf.device_pointer()
    assert torch.equal(view.cpu().view(torch.int16), host.view(torch.int16))
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 4096, 999)).cuda()
    out = torch.empty((999, 1024), dtype=torch.bfloat16, device="cuda")
    gather_rows(view, idx, out)
    assert torch.equal(out.cpu().view(torch.int16), host[idx.cpu()].view(torch.int16))
    host[7] = 3.0  # a host write is visible to the device read that follows
    assert bool((view[7] == 3.0).all())
    del view, out
    torch.cuda.synchronize()
    buf.close()
    assert buf.registered_device is None
