"""Engine settings: one dataclass, the single source of their defaults.

``engram-serve`` builds its flags (and ``ENGRAM_*`` variables) from these fields: a field's
``metadata`` carries its help text and choices; fields marked ``cli=False`` are for
programs that drive the engine directly (the benchmark, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.checkpoint import default_model_dir
from models.dtype import CHOICES as DTYPE_CHOICES
from offload.numa import parse_policy
from offload.paths import FILE_PLACEMENT, GATHERS, Placement
from offload.row_reader import FILE_IO
from offload.shared_tables import SharedTables
from offload.store import ROW_FORMATS

from .attention import BACKENDS
from .kv_cache import blocks_for


def flag(default, help: str, **extra):
    """A field with CLI metadata (help text, choices, metavar, cli=False to hide it)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    model: str | None = flag(None, "checkpoint directory (default: the built-in stdlib model)")
    device: str | None = flag(None, "cuda, cuda:1 or cpu (default: cuda when available)")
    dtype: str = flag(
        "auto",
        "backbone dtype (auto: on CUDA bfloat16 for a float32 or bfloat16 checkpoint, float16 "
        "for a float16 one; float32 on a CPU)",
        choices=list(DTYPE_CHOICES),
    )
    placement: str | None = flag(
        None,
        "where Engram tables live (default: host with CUDA and CuPy, gpu with CUDA only, "
        "cpu without CUDA; file: rows stay in the checkpoint's file, a DRAM cache of "
        "--host-memory-bytes in the host tier)",
        choices=[*(p.value for p in Placement), FILE_PLACEMENT],
    )
    host_memory_bytes: int = flag(
        0,
        "host memory for Engram tables (0: no limit); tables larger than this are served by "
        "the file tier with a DRAM cache of this size",
    )
    file_layers: str | None = flag(
        None,
        "Engram layer ids whose tables stay in the checkpoint's file behind a DRAM cache of "
        "--host-memory-bytes, comma-separated (e.g. 1,15); the others load whole into "
        "--placement (default: every layer or none, by the tables' size)",
    )
    file_read_threads: int = flag(
        8, "threads reading file-tier rows (parallel preadv; 8 measured best, bench.file_tier)"
    )
    file_io: str = flag(
        "auto",
        "how file-tier rows are read: uring (a step's reads in one io_uring syscall), pread "
        "(preadv per run, pages announced with fadvise), auto (uring where the kernel allows)",
        choices=list(FILE_IO),
    )
    gather: str = flag("auto", "how rows reach the compute device", choices=list(GATHERS))
    dedup: bool = flag(False, "fetch each distinct row once per step")
    deterministic: bool = flag(
        False,
        "deterministic kernels: the same steps give bit-identical tokens run after run "
        "(may be slower; see engine/determinism.py)",
    )
    row_format: str = flag(
        "auto",
        "Engram row format: auto (as stored: bf16, or fp8 from engram-quantize), fp8 "
        "(quantise at load: half the bytes per row), bf16/f16/f32",
        choices=list(ROW_FORMATS),
    )
    huge_pages: bool = flag(
        True,
        "back host tables with 2 MiB pages where the OS allows",
        off_help="back host tables with ordinary 4 KiB pages instead of 2 MiB ones",
    )
    shared_tables: bool = flag(
        False,
        "keep host Engram tables in shared memory on the node: the first engine loads them, "
        "every other (and a restarted one) attaches in seconds",
    )
    shared_tables_dir: str | None = flag(
        None,
        "directory of the shared tables; implies --shared-tables (default: a hugetlbfs mount "
        "with room, else /dev/shm)",
    )
    shared_tables_numa: str = flag(
        "auto",
        "NUMA node of the shared tables: auto (the node of the engine's GPU: engines on "
        "several nodes keep one copy per node), off (one copy, pages where first touched), "
        "or a node number",
    )
    hot_rows: str = flag(
        "0",
        "rows of each Engram layer kept in a hot-row cache on the compute device: a count, or "
        "a fraction of the table's rows (0.01); 0: no cache",
    )
    hot_rows_file: str | None = flag(
        None,
        "the hot set, written by engram-profile (default: engram_hot_rows.safetensors "
        "beside the checkpoint when present)",
    )
    hot_rows_policy: str = flag(
        "static",
        "static: the profiled set; adaptive: counts kept while serving, refreshed every "
        "--hot-rows-refresh steps, at most --hot-rows-replace rows per refresh",
        choices=["static", "adaptive"],
    )
    hot_rows_refresh: int = flag(64, "steps between adaptive hot-set refreshes")
    hot_rows_replace: int = flag(256, "rows an adaptive refresh may replace (its bounded cost)")
    gather_threads: int = flag(0, "host threads of the staged gather (0: from the core count)")
    max_model_len: int = flag(
        0, "tokens per sequence, prompt + output (0: the model's max_position_embeddings)"
    )
    max_num_seqs: int = flag(32, "sequences in the running batch")
    max_num_batched_tokens: int = flag(1024, "tokens per step (prompt chunks + decodes)")
    max_queue: int = flag(256, "sequences allowed to wait before 429")
    stream_interval: int = flag(
        1,
        "tokens a sequence's stream gathers before it is sent (as vLLM's): the first token "
        "and the last go at once; larger values cost the HTTP layer less per token at many "
        "streams, the client sees tokens in groups",
    )
    kv_blocks: int = flag(0, "KV cache blocks of 16 tokens (0: fit max-num-seqs full contexts)")
    attention: str = flag(
        "auto",
        "attention kernels: Triton paged kernels on CUDA (auto), or the SDPA reference",
        choices=list(BACKENDS),
    )
    enforce_eager: bool = flag(False, "run decode steps eagerly instead of CUDA-graph replay")
    no_overlap: bool = flag(
        False,
        "run each step's host work (scheduling, hashing, packing, detokenizing, stop strings) "
        "in series with the device instead of while the device runs the step before",
    )
    device_rows: bool | None = flag(
        None,
        "overlap: step N+1's placeholders take their input ids and Engram rows from step N's "
        "sampled tokens on the device, where the rows' path reads device indices (resident "
        "tables, UVA, no de-duplication); None: on CUDA; True also on a CPU, for tests",
        cli=False,
    )
    static_decode: bool | None = flag(
        None,
        "decode through the CUDA-graph buffers (None: on CUDA unless enforce_eager; on a CPU "
        "it runs them eagerly, for tests)",
        cli=False,
    )
    max_memories: int = flag(
        0,
        "Engram memories (besides the base's own) with module weights on the device at once; "
        "sequences of others wait, their weights in host memory, least recently used moved "
        "out first (0: no limit)",
    )
    block_size: int = flag(16, "tokens per KV block", cli=False)
    prefill_first: bool = flag(False, "no decodes while a prompt is pending", cli=False)

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else default_model_dir()

    def file_layer_ids(self) -> list[int] | None:
        """``file_layers`` as sorted layer ids (None: not set); ValueError naming the flag."""
        if self.file_layers is None:
            return None
        parts = [p.strip() for p in self.file_layers.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(
                f"--file-layers {self.file_layers!r}: give Engram layer ids separated by commas, "
                "e.g. 1,15"
            )
        return sorted({int(p) for p in parts})

    def shared(self) -> SharedTables | None:
        """Where host tables are shared on the node, or None (each engine its own copy)."""
        if not (self.shared_tables or self.shared_tables_dir):
            return None
        where = Path(self.shared_tables_dir) if self.shared_tables_dir else None
        return SharedTables(where, self.huge_pages, numa_policy=self.shared_tables_numa)

    def num_kv_blocks(self, max_context: int) -> int:
        """The KV pool: ``kv_blocks``, or enough for max_num_seqs sequences of max_context."""
        return self.kv_blocks or self.max_num_seqs * blocks_for(max_context, self.block_size)

    def check(self) -> None:
        """ValueError naming the setting when a number cannot work."""
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_queue",
            "block_size",
            "stream_interval",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        parse_policy(self.shared_tables_numa)
        if self.gather_threads < 0:
            raise ValueError("--gather-threads must be 0 (from the core count) or more")
        if self.host_memory_bytes < 0 or self.file_read_threads < 1:
            raise ValueError("--host-memory-bytes must be 0 or more, --file-read-threads 1 or more")
        if self.file_layer_ids() is not None and not self.host_memory_bytes:
            raise ValueError("--file-layers needs --host-memory-bytes (the DRAM cache)")
        if self.placement == FILE_PLACEMENT and not self.host_memory_bytes:
            raise ValueError("--placement file needs --host-memory-bytes (the DRAM cache)")
        if self.hot_rows_refresh < 1 or self.hot_rows_replace < 1:
            raise ValueError("--hot-rows-refresh and --hot-rows-replace must be at least 1")
        if self.max_memories < 0:
            raise ValueError("--max-memories must be 0 (no limit) or more")
        if self.kv_blocks < 0:
            raise ValueError("--kv-blocks must be 0 (fit --max-num-seqs) or more")
