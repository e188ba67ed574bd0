"""A pytest plugin for ``bench/gpu-check``'s test stage (``-p bench.gpu_select``): keep the
``gpu``-marked tests and every test of the files whose kernels run on CUDA when it is there
(unmarked, so ``-m gpu`` would drop them), the gpu-marked first; mark the gpu-marked ones in
the JUnit report (a ``marker=gpu`` property) so skips among them can be told apart.

``ENGRAM_GPU_TEST_FILES`` (comma-separated file names) replaces the list (the CPU dry run).
"""

from __future__ import annotations

import os
from pathlib import Path

CUDA_FILES = (
    "test_uva_kernel.py",
    "test_paged_attention.py",
    "test_fused.py",
    "test_kernel_check.py",
    "test_engine_paths.py",
)


def files() -> set[str]:
    given = os.environ.get("ENGRAM_GPU_TEST_FILES")
    return {f.strip() for f in given.split(",") if f.strip()} if given else set(CUDA_FILES)


def pytest_collection_modifyitems(config, items) -> None:
    names = files()
    marked = [i for i in items if i.get_closest_marker("gpu") is not None]
    for i in marked:
        i.user_properties.append(("marker", "gpu"))
    chosen = {id(i) for i in marked}
    rest = [i for i in items if id(i) not in chosen and Path(str(i.fspath)).name in names]
    keep = marked + rest
    kept = {id(i) for i in keep}
    dropped = [i for i in items if id(i) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
