"""Deterministic mode: the same steps give the same bits, run after run and path after path.

What it guarantees: requests scheduled into the same steps (same batch composition, same
prompt chunks) produce bit-identical logits and greedy tokens from run to run, and across
every offload path (their Engram rows are bit-identical; this makes the backbone's kernels
deterministic too). What it does not: a request's tokens being independent of what else
shares its batch. A different batch size can pick a different GEMM kernel with a different
summation order; that property (batch invariance) is not something these switches give.

It sets, for the whole process:
- ``torch.use_deterministic_algorithms(True)`` (ops without a deterministic kernel raise);
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS needs for deterministic GEMMs. torch reads
  it at the process's first CUDA matmul, so it must be set before that (``engram-serve`` and
  ``engram-bench`` call this before loading the model; set too late, torch raises at the first
  matmul instead of silently running non-deterministic kernels);
- no reduced-precision reductions in bf16/fp16 GEMMs, no TF32, cuDNN deterministic and not
  benchmarking;
- ``torch.utils.deterministic.fill_uninitialized_memory = False``: filling every new tensor
  costs time on each allocation and only matters for code that reads memory it never wrote.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

import torch
import torch.utils.deterministic

CUBLAS_WORKSPACE = ":4096:8"
_VALID_WORKSPACES = (":4096:8", ":16:8")  # the two settings cuBLAS documents as deterministic

log = logging.getLogger("engram.engine")


@dataclass(frozen=True)
class Settings:
    """The process-wide switches deterministic mode touches (``current()`` reads them)."""

    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    matmul_tf32: bool
    cudnn_tf32: bool
    bf16_reduced_precision: bool
    fp16_reduced_precision: bool
    fill_uninitialized_memory: bool

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DETERMINISTIC = Settings(
    deterministic_algorithms=True,
    cudnn_deterministic=True,
    cudnn_benchmark=False,
    matmul_tf32=False,
    cudnn_tf32=False,
    bf16_reduced_precision=False,
    fp16_reduced_precision=False,
    fill_uninitialized_memory=False,
)
# torch's own defaults: what set_deterministic(False) goes back to
DEFAULT = Settings(
    deterministic_algorithms=False,
    cudnn_deterministic=False,
    cudnn_benchmark=False,
    matmul_tf32=False,
    cudnn_tf32=True,
    bf16_reduced_precision=True,
    fp16_reduced_precision=True,
    fill_uninitialized_memory=True,
)


def current() -> Settings:
    m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return Settings(
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=bool(cudnn.deterministic),
        cudnn_benchmark=bool(cudnn.benchmark),
        matmul_tf32=bool(m.allow_tf32),
        cudnn_tf32=bool(cudnn.allow_tf32),
        bf16_reduced_precision=bool(m.allow_bf16_reduced_precision_reduction),
        fp16_reduced_precision=bool(m.allow_fp16_reduced_precision_reduction),
        fill_uninitialized_memory=bool(torch.utils.deterministic.fill_uninitialized_memory),
    )


def apply(s: Settings) -> None:
    """Set every switch to ``s`` (e.g. the settings :func:`set_deterministic` returned)."""
    m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    torch.use_deterministic_algorithms(s.deterministic_algorithms)
    cudnn.deterministic = s.cudnn_deterministic
    cudnn.benchmark = s.cudnn_benchmark
    m.allow_tf32 = s.matmul_tf32
    cudnn.allow_tf32 = s.cudnn_tf32
    m.allow_bf16_reduced_precision_reduction = s.bf16_reduced_precision
    m.allow_fp16_reduced_precision_reduction = s.fp16_reduced_precision
    torch.utils.deterministic.fill_uninitialized_memory = s.fill_uninitialized_memory


def set_deterministic(enabled: bool) -> Settings:
    """Deterministic mode on (or torch's defaults back, with ``False``) for the whole process.
    Returns the settings it replaced, so a caller can ``apply()`` them to undo."""
    before = current()
    if enabled and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _VALID_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        if torch.cuda.is_initialized():
            log.warning(
                "CUBLAS_WORKSPACE_CONFIG set after CUDA started; if a CUDA matmul already ran, "
                "torch refuses deterministic GEMMs: export CUBLAS_WORKSPACE_CONFIG=%s first",
                CUBLAS_WORKSPACE,
            )
    apply(DETERMINISTIC if enabled else DEFAULT)
    return before


def is_deterministic() -> bool:
    """True when every switch is as deterministic mode sets it."""
    return current() == DETERMINISTIC and (
        os.environ.get("CUBLAS_WORKSPACE_CONFIG") in _VALID_WORKSPACES
    )
