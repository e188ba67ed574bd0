"""Triton's interpreter (``TRITON_INTERPRET=1``) on Triton 3.5/3.6 with numpy 2.4.

The interpreter holds every scalar as a one-element numpy array and converts it for Python's
``range`` with ``int(array)``, which numpy 2.4 refuses for arrays of one dimension. So every
kernel whose loop bounds are tensors (the persistent-grid gathers, the attention loops over KV
tiles) fails there with "only 0-dimensional arrays can be converted to Python scalars". Later
Triton releases convert with ``int(array.squeeze())``; :func:`patch_interpreter` installs that
conversion on the releases that lack it, and does nothing elsewhere (compiled kernels, a
Triton that already converts correctly, no Triton at all).
"""

from __future__ import annotations

import numpy as np


def _index(self) -> int:
    data = self.handle.data
    return int(data.reshape(-1)[0]) if data.size == 1 else int(data)  # else numpy raises


def _converts_scalars(patch_tensor, scope_cls) -> bool:
    """Whether the interpreter's tensor patch turns a one-element 1-D scalar into an int."""

    class Probe:
        pass

    class Handle:
        data = np.array([3], dtype=np.int32)

    scope = scope_cls()
    try:
        patch_tensor(Probe, scope)
        probe = Probe()
        probe.handle = Handle()
        return int(probe.__index__()) == 3
    except Exception:
        return False
    finally:
        scope.restore()


def patch_interpreter() -> bool:
    """Make the interpreter's scalar-to-index conversion work with numpy 2.4 (idempotent).
    True when a patch was installed by this call."""
    try:
        from triton.runtime import interpreter
    except Exception:  # no Triton, or one without the interpreter module
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_cls is None or getattr(original, "engram_patched", False):
        return False
    if _converts_scalars(original, scope_cls):
        return False

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched.engram_patched = True
    interpreter._patch_lang_tensor = patched
    return True
