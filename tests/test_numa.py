"""NUMA placement of shared tables: the policy read from a (fake) sysfs tree of multi-node
machines, one copy per node by name, the real binding on this machine's node 0 (the kernel's own
numa_maps and get_mempolicy say where the pages are), a node without room refused in one line."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offload import numa
from offload.numa import NumaRoomError, choose
from offload.shared_tables import SharedTables, stale_versions, table_name
from offload.shm_mounts import shmem_huge
from offload.store import TableStore, cupy_ok

ROOT = Path(__file__).resolve().parents[1]
# a two-socket machine: GPUs 0-1 on node 0, 2-3 on node 1, one whose platform gives no node
BUSES = ["0000:17:00.0", "0000:3b:00.0", "0000:ca:00.0", "0000:e3:00.0", "0000:03:00.0"]
NODES = [0, 0, 1, 1, -1]


def fake_sys(root: Path, free_kib=(64 << 20, 64 << 20), online="0-1") -> Path:
    for bus, node in zip(BUSES, NODES, strict=True):
        d = root / "bus/pci/devices" / bus
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")
    nodes = root / "devices/system/node"
    nodes.mkdir(parents=True)
    (nodes / "online").write_text(online + "\n")
    for n, kib in enumerate(free_kib):
        (nodes / f"node{n}").mkdir()
        (nodes / f"node{n}/meminfo").write_text(
            f"Node {n} MemTotal:       {2 * kib} kB\nNode {n} MemFree:        {kib} kB\n"
        )
    return root


def bus_of(index: int) -> str:
    return BUSES[index].upper()[5:]  # as CUDA may spell it: no domain, upper case


@pytest.fixture
def shm():
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="engram-numa-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "engram.safetensors"
    rows = torch.randn(4096, 256).to(torch.bfloat16)  # 2 MiB
    save_file({"t": rows}, str(path))
    return path, rows


def test_policy_from_a_two_socket_sysfs(tmp_path):
    root = fake_sys(tmp_path)
    assert numa.online_nodes(root) == [0, 1]
    got = [choose("auto", torch.device("cuda", i), root, bus_of).node for i in range(5)]
    assert got == [0, 0, 1, 1, None]
    assert "0000:ca:00.0" in choose("auto", torch.device("cuda", 2), root, bus_of).why
    assert "no NUMA node" in choose("auto", torch.device("cuda", 4), root, bus_of).why
    assert choose("auto", torch.device("cpu"), root, bus_of).node is None
    assert choose("off", torch.device("cuda", 2), root, bus_of).node is None
    assert choose("1", torch.device("cuda", 0), root, bus_of).node == 1  # asked for: obeyed
    with pytest.raises(ValueError, match="no such NUMA node .*online: 0,1"):
        choose("2", torch.device("cuda", 0), root, bus_of)
    with pytest.raises(ValueError, match="--shared-tables-numa 'near'"):
        choose("near", torch.device("cuda", 0), root, bus_of)
    # a machine without the node tree (or an unknown GPU) places nothing
    assert numa.online_nodes(tmp_path / "none") == [0]
    assert choose("auto", torch.device("cuda", 0), tmp_path / "none", bus_of).node is None
    assert numa.sysfs_bus_id("00000000:CA:00.0") == "0000:ca:00.0"
    assert numa.node_free(1, root) == (64 << 30) and numa.node_free(5, root) is None
    assert numa.online_nodes(fake_sys(tmp_path / "b", (1,) * 4, "0,2-3")) == [0, 2, 3]


def test_engines_on_two_nodes_keep_one_copy_per_node(table):
    path, _ = table
    names = {n: table_name(path, "t", "torch.bfloat16", (4096, 256), n) for n in (None, 0, 1)}
    assert len(set(names.values())) == 3 and names[1].split("-")[-2] == "n1"
    # a changed checkpoint replaces a node's own copy, never the other node's
    root = path.parent / "shm"
    root.mkdir()
    for name in names.values():
        (root / name).touch()
    assert stale_versions(root, names[0]) == []
    old = root / names[0].replace(names[0].split("-")[-1], "0123456789abcdef.rows")
    old.touch()
    assert stale_versions(root, names[0]) == [old]


def test_real_binding_on_node_0(table, shm):
    path, rows = table
    shared = SharedTables(shm, numa_policy="0")
    store = TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    assert torch.equal(store[0].tensor, rows) and shared.loaded
    buf = store[0].memory
    assert "-n0-" in buf.path.name
    # the kernel's own view: the file's policy is bind:0 and every resident page is on node 0
    maps = Path("/proc/self/numa_maps").read_text().splitlines()
    lines = [ln for ln in maps if buf.path.name in ln]
    assert lines and all(" bind:0 " in ln for ln in lines), lines
    counts = [f for ln in lines for f in ln.split() if f[0] == "N" and "=" in f]
    assert counts and all(f.startswith("N0=") for f in counts), lines
    assert {numa.page_node(buf.ptr + off) for off in range(0, buf.nbytes, 1 << 16)} == {0}
    placed = store.describe()["shared"]
    assert placed[0]["numa_node"] == 0 and placed[0]["pages_by_node"] == {"0": 64}
    assert placed[0]["huge_pages_allowed"] == shmem_huge(shm)
    # another process attaches to node 0's copy and reads its pages from node 0
    code = (
        "import sys; from pathlib import Path; from offload.shared_tables import SharedTables;"
        "from offload.store import TableStore;"
        "s = SharedTables(Path(sys.argv[2]), numa_policy='0');"
        "st = TableStore.from_safetensors(sys.argv[1], {0: 't'}, 'cpu', progress=False, shared=s);"
        "d = st.describe()['shared'][0]; print(len(s.attached), d['numa_node'], d['pages_by_node'])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(shm)], capture_output=True, text=True, env=env
    )
    assert out.stdout.strip().split(maxsplit=2) == ["1", "0", "{'0': 64}"], out.stderr


def test_node_without_room_is_refused_in_one_line(table, shm, tmp_path):
    path, _ = table
    root = fake_sys(tmp_path / "sys", free_kib=(1024, 64 << 20))  # node 0: 1 MiB free
    shared = SharedTables(shm, numa_policy="0", sys_root=root)
    with pytest.raises(NumaRoomError) as e:
        TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
    msg = str(e.value)
    assert "\n" not in msg and "2097152 bytes" in msg and "NUMA node 0" in msg
    assert "1048576 free" in msg and "--shared-tables-numa" in msg
    assert not list(shm.rglob("*.rows")) and not list(shm.rglob("*.tmp-*"))


def test_cpu_engine_and_off_place_nothing(table, shm):
    path, rows = table
    for policy in ("auto", "off"):
        shared = SharedTables(shm / policy, numa_policy=policy)
        store = TableStore.from_safetensors(path, {0: "t"}, "cpu", progress=False, shared=shared)
        placed = store.describe()["shared"][0]
        assert placed["numa_node"] is None and "-n" not in store[0].memory.path.name[-30:]
        assert torch.equal(store[0].tensor, rows)


def test_huge_pages_allowed_from_mounts(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /dev/shm tmpfs rw,size=10g,huge=advise 0 0\n"
        "none /mnt/huge hugetlbfs rw,pagesize=2M 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
    )
    enabled = tmp_path / "shmem_enabled"
    enabled.write_text("always within_size advise [never] deny force\n")
    assert shmem_huge(Path("/dev/shm/engram-serve"), mounts, enabled) == "advise"
    assert shmem_huge(Path("/mnt/huge/x"), mounts, enabled) == "hugetlbfs"
    assert shmem_huge(Path("/run/x"), mounts, enabled) == "never"
    assert shmem_huge(Path("/home/x"), mounts, enabled) == "none"
    enabled.write_text("always within_size advise never deny [force]\n")
    assert shmem_huge(Path("/run/x"), mounts, enabled) == "always"


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")
def test_gpu_tables_land_on_the_node_of_their_gpu(table, shm):
    """On a real GPU: its PCI address is in sysfs, auto picks that device's node, the table's
    pages sit there (or nothing is bound where the platform reports no node), and the
    registered table gathers on the device."""
    path, rows = table
    bus = numa.pci_bus_id(0)
    assert bus and Path("/sys/bus/pci/devices", bus).is_dir(), bus
    want = numa.gpu_node(bus)
    assert choose("auto", torch.device("cuda", 0)).node == want
    shared = SharedTables(shm)
    store = TableStore.from_safetensors(
        path, {0: "t"}, "host", "cuda:0", progress=False, shared=shared
    )
    t = store[0]
    assert t.memory.registered_device == 0 and t.memory.numa.node == want
    placed = store.describe()["shared"][0]
    assert placed["numa_node"] == want
    if want is not None:
        assert placed["pages_by_node"] == {str(want): 64} and f"-n{want}-" in t.memory.path.name
    idx = torch.randint(0, rows.shape[0], (257,), device="cuda")
    got = t.device_view(torch.device("cuda", 0))[idx].cpu()
    assert torch.equal(got.view(torch.int16), rows[idx.cpu()].view(torch.int16))


def test_binding_puts_the_threads_own_policy_back():
    """A process started under numactl keeps its policy: ``bound`` restores what it found."""
    mode, _ = numa.thread_policy()
    assert mode == numa.MPOL_DEFAULT
    preferred = 1  # MPOL_PREFERRED on node 0, as `numactl --preferred 0` sets it
    numa.set_thread_policy(preferred, numa._mask(0)[0])
    try:
        with numa.bound(0):
            assert numa.thread_policy()[0] == numa.MPOL_BIND
        mode, mask = numa.thread_policy()
        assert mode == preferred and mask[0] == 1
    finally:
        numa.set_thread_policy(numa.MPOL_DEFAULT)
    assert numa.thread_policy()[0] == numa.MPOL_DEFAULT
