"""OS names for the project's threads, so ``top -H``, ``ps -L`` and ``/proc`` tell the device
worker, the engine loop and the row pools apart (Python before 3.14 names threads only inside
Python; everything shows as the process's name)."""

from __future__ import annotations

import threading


def name_os_thread() -> None:
    """Give the calling thread's OS thread its Python name (Linux keeps 15 bytes). A
    ``ThreadPoolExecutor`` initializer, or the first call of a thread's target."""
    name = threading.current_thread().name[:15]
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
    except OSError:  # not Linux, or no writable /proc: a name is a convenience
        pass
