"""Shared tables on a node: loaded once into a shared file, attached by every other process,
rows bit-identical, resident once (PSS), refused when the space is too small, never attached
when stale or half loaded."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offload.shared_tables import SharedSpaceError, SharedTables, mapping_pss
from offload.store import TableStore, cupy_ok

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys
from pathlib import Path
import torch
from offload.shared_tables import SharedTables
from offload.store import TableStore
path, directory, row_format, chunk, hold = sys.argv[1:6]
shared = SharedTables(Path(directory))
store = TableStore.from_safetensors(
    path, {0: "t"}, "cpu", row_format=row_format, chunk_rows=int(chunk), shared=shared,
    progress=False)
t = store[0].tensor
raw = bytes(t.contiguous().view(-1).view(torch.uint8).numpy())
print(json.dumps({
    "loaded": shared.loaded, "attached": shared.attached, "path": str(store[0].memory.path),
    "sha": hashlib.sha256(raw).hexdigest(), "bytes": t.numel() * t.element_size(),
}), flush=True)
if hold == "1":
    sys.stdin.readline()
"""


@pytest.fixture
def shm():
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="engram-test-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_table(path, rows=4096, width=256, seed=0):
    torch.manual_seed(seed)
    t = torch.randn(rows, width).to(torch.bfloat16)
    save_file({"t": t}, str(path))
    return t


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(bytes(t.contiguous().view(-1).view(torch.uint8).numpy())).hexdigest()


def child(path, directory, row_format="auto", chunk=1 << 16, hold=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", CHILD, str(path), str(directory), row_format, str(chunk)]
    return subprocess.Popen(
        [*args, "1" if hold else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def report(p) -> dict:
    line = p.stdout.readline()
    if not line:
        raise AssertionError(p.stderr.read())
    return json.loads(line)


def test_second_process_attaches_rows_identical_resident_once(tmp_path, shm):
    path = tmp_path / "engram.safetensors"
    rows = write_table(path)
    a = child(path, shm, hold=True)
    first = report(a)
    b = child(path, shm, hold=True)
    second = report(b)
    try:
        assert first["loaded"] and not first["attached"]
        assert second["attached"] == first["loaded"] and not second["loaded"]
        assert first["sha"] == second["sha"] == sha(rows)
        pss = [mapping_pss(p.pid, first["path"]) for p in (a, b)]
        # both processes have every page mapped; each is charged half: the table is resident once
        assert 0.9 * first["bytes"] <= sum(pss) <= 1.1 * first["bytes"] + (2 << 20), pss
        assert max(pss) < 0.75 * first["bytes"], pss
    finally:
        for p in (a, b):
            p.communicate("\n", timeout=30)
    # the file outlives both processes: a third attaches too
    assert Path(first["path"]).exists()
    third = child(path, shm)
    assert report(third)["attached"] and third.wait(30) == 0


def test_fp8_conversion_shared_and_identical_to_unshared(tmp_path, shm):
    path = tmp_path / "engram.safetensors"
    write_table(path)
    plain = TableStore.from_safetensors(path, {0: "t"}, "cpu", row_format="fp8", progress=False)
    shared = SharedTables(shm)
    s1 = TableStore.from_safetensors(
        path, {0: "t"}, "cpu", row_format="fp8", progress=False, shared=shared
    )
    s2 = TableStore.from_safetensors(
        path, {0: "t"}, "cpu", row_format="fp8", progress=False, shared=shared
    )
    assert len(shared.loaded) == 1 and shared.attached == shared.loaded
    assert s1[0].fp8 and s2[0].fp8 and s1[0].row_dtype == plain[0].row_dtype
    assert torch.equal(s2[0].tensor, plain[0].tensor)
    assert s1.load_stats.bytes == plain[0].nbytes and s2.load_stats.bytes == 0
    # a different row format is a different table, never the fp8 rows read as bf16
    s3 = TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    assert len(shared.loaded) == 2 and s3[0].tensor.dtype == torch.bfloat16


def test_changed_checkpoint_is_not_attached(tmp_path, shm):
    path = tmp_path / "engram.safetensors"
    write_table(path, seed=0)
    shared = SharedTables(shm)
    TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    time.sleep(0.01)  # a new mtime even on coarse clocks
    new = write_table(path, seed=1)
    store = TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    assert len(shared.loaded) == 2 and not shared.attached
    assert torch.equal(store[0].tensor, new)
    # the old version's file is gone (whoever still maps it keeps its pages), the new one stays
    assert [p.name for p in shm.glob("*.rows")] == [shared.loaded[1]]


def test_too_small_space_is_refused_in_one_line(tmp_path, shm):
    path = tmp_path / "engram.safetensors"
    write_table(path)
    real = os.statvfs(shm)
    # the real statvfs of the directory, less all but 1 MiB of it: a 2 MiB table cannot fit
    shared = SharedTables(shm, free=lambda p: min(real.f_bavail * real.f_frsize, 1 << 20))
    with pytest.raises(SharedSpaceError) as e:
        TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    msg = str(e.value)
    assert "\n" not in msg and "2097152 bytes" in msg
    assert "shm_size" in msg and "medium: Memory" in msg and "--shared-tables-dir" in msg
    assert not list(shm.rglob("*.rows")) and not list(shm.rglob("*.tmp-*"))


def test_killed_loader_leaves_no_ready_table(tmp_path, shm):
    path = tmp_path / "engram.safetensors"
    rows = write_table(path, rows=1 << 17, width=32)
    p = child(path, shm, chunk=1)  # a row per read: slow enough to kill mid-load
    deadline = time.monotonic() + 60
    while not list(shm.glob("*.tmp-*")):
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        time.sleep(0.005)
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert not list(shm.glob("*.rows")), "a half-loaded table was marked READY"
    shared = SharedTables(shm)
    store = TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    assert shared.loaded and not shared.attached and torch.equal(store[0].tensor, rows)
    assert not list(shm.glob("*.tmp-*"))  # the dead loader's file is cleaned up


def test_two_processes_starting_together_load_once(tmp_path, shm):
    path = tmp_path / "engram.safetensors"
    rows = write_table(path, rows=1 << 15, width=64)
    procs = [child(path, shm, chunk=256) for _ in range(2)]
    outs = [report(p) for p in procs]
    for p in procs:
        assert p.wait(60) == 0
    assert sorted(len(o["loaded"]) for o in outs) == [0, 1]
    assert sorted(len(o["attached"]) for o in outs) == [0, 1]
    assert outs[0]["sha"] == outs[1]["sha"] == sha(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")
def test_gpu_shared_table_is_registered_and_gathered_on_the_device(tmp_path, shm):
    from offload.uva_kernel import gather_rows

    path = tmp_path / "engram.safetensors"
    rows = write_table(path)
    stores = [
        TableStore.from_safetensors(
            path, {0: "t"}, "host", "cuda", progress=False, shared=SharedTables(shm)
        )
        for _ in range(2)  # the second attaches to the first's file and registers it too
    ]
    for store in stores:
        t = store[0]
        assert t.memory.registered_device is not None and t.tensor.is_pinned()
        view = t.device_view(torch.device("cuda"))
        idx = torch.randint(0, rows.shape[0], (999,), device="cuda")
        out = torch.empty((999, rows.shape[1]), dtype=torch.bfloat16, device="cuda")
        gather_rows(view, idx, out)
        assert torch.equal(out.cpu().view(torch.int16), rows[idx.cpu()].view(torch.int16))
        del view
    torch.cuda.synchronize()


FULL = r"""
import sys
from pathlib import Path
from offload.shared_tables import SharedSpaceError, SharedTables
from offload.store import TableStore
small = Path(sys.argv[2])
# statvfs says there is room (as a racing writer could leave it): the reservation must refuse
shared = SharedTables(small, free=lambda p: 1 << 40)
try:
    TableStore.from_safetensors(sys.argv[1], {0: "t"}, "cpu", progress=False, shared=shared)
except SharedSpaceError as e:
    print("refused:", e)
print("left:", sorted(p.name for p in small.rglob("*") if p.suffix != ".lock"))
"""


def test_a_really_full_tmpfs_refuses_at_reservation_not_sigbus(tmp_path):
    """A 1 MiB tmpfs of our own (a user and mount namespace) and a 2 MiB table: the pages are
    reserved before any row is written, so the load fails in one line and leaves no file."""
    unshare = shutil.which("unshare")
    probe = [unshare or "unshare", "-rm", "true"]
    if unshare is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user namespaces) to mount a small tmpfs")
    path = tmp_path / "engram.safetensors"
    write_table(path)  # 2 MiB
    small = tmp_path / "small"
    small.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL)
    cmd = f"mount -t tmpfs -o size=1m none {small} && {sys.executable} {script} {path} {small}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [unshare, "-rm", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    refused = [ln for ln in out.stdout.splitlines() if ln.startswith("refused:")]
    assert len(refused) == 1 and "cannot reserve 2097152 bytes" in refused[0], out.stdout
    assert "shm_size" in refused[0] and "--shared-tables-dir" in refused[0]
    assert "(no space left)" in refused[0], refused
    assert "left: []" in out.stdout, out.stdout
