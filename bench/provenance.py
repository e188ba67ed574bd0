"""Where a result came from: device, driver, library versions, the code's git commit."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from .commit import git_commit

REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def _run(args: list[str], cwd: Path | None = None) -> str | None:
    """A command's stripped stdout, or None when it is missing or fails."""
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def nvidia_driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def environment(device: torch.device) -> dict:
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "triton": _version("triton"),
        "cupy": None,
        "cuda_driver": None,
        "nvidia_driver": nvidia_driver() if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **git_commit(),
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
        if device.type == "cuda":
            v = cupy.cuda.runtime.driverGetVersion()
            env["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
    except Exception:
        pass
    return env
