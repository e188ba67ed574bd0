"""Server settings: the HTTP side's own fields plus the engine's (:class:`EngineConfig`).

Defaults live here and in ``EngineConfig`` only; ``engram-serve``'s flags and ``ENGRAM_*``
variables are built from both dataclasses (see cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig, flag

LOG_LEVELS = ("debug", "info", "warning", "error")
METRICS_NAMES = ("both", "engram", "vllm")


@dataclass
class ServerConfig:
    served_model_name: list[str] | None = flag(
        None,
        "model name(s) clients send and /v1/models lists; the first is the one answers carry "
        "and metrics are labelled with (default: the --model string as given, as vLLM; "
        "engram-stdlib for the built-in model)",
        nargs="+",
    )
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "port to listen on")
    api_key: str | None = flag(
        None,
        "require 'Authorization: Bearer KEY' on every /v1 path and the tokenizer endpoints; "
        "/health, /version, /metrics and the OpenAPI pages stay open (default: no key)",
    )
    max_body_bytes: int = flag(1 << 20, "larger request bodies get 413")
    bench_result: str | None = flag(
        None, "engram-bench JSON shown by GET /v1/offload (default: none)"
    )
    chat_template: str | None = flag(
        None,
        "chat template FILE (jinja2) for /v1/chat/completions (default: the model's, from "
        "chat_template.jinja or tokenizer_config.json)",
    )
    log_level: str = flag("info", "log level", choices=list(LOG_LEVELS))
    shutdown_timeout: float = flag(
        30.0,
        "seconds running requests get to finish after SIGTERM/SIGINT (new ones get 503); "
        "what is left then ends with an error",
    )
    cpu_threads: int = flag(
        0,
        "torch CPU threads (0: one per core less one, which stays free for the HTTP loop and "
        "the row worker; oversubscribed cores make every step wait)",
    )
    metrics_names: str = flag(
        "both",
        "serving metrics under vLLM's vllm:* names, engram_* names, or both",
        choices=list(METRICS_NAMES),
    )
    data_parallel_size: int = flag(
        1,
        "engine processes behind this one HTTP front (one per GPU; on a CPU, CPU engines), "
        "host tables shared on the node",
    )
    engine_process: bool = flag(
        False,
        "run the engine in a process of its own behind this HTTP front (as vLLM's engine "
        "core): the event loop and the engine's threads stop sharing one GIL, deltas come "
        "over ZeroMQ one message per step; always so with --data-parallel-size above 1",
    )
    memories: list[str] | None = flag(
        None,
        "Engram memories served beside the base, as NAME=DIR (checkpoints of the same base: "
        "this project's format or TinyEngram's); a request's model NAME picks one (default: "
        "none, the base alone)",
        nargs="+",
        metavar="NAME=DIR",
    )
    allow_memory_updates: bool = flag(
        False,
        "allow POST /v1/memories (load, reload) and DELETE /v1/memories/NAME while serving "
        "(behind --api-key when one is set)",
    )
    fast_routes: bool = flag(
        True,
        "POST /v1/completions and /v1/chat/completions go straight to their handlers once the "
        "body validates (anything else through FastAPI's router, the same answers)",
        off_help="route every request through FastAPI's router (the same answers, more CPU per "
        "request)",
    )
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def model_dir(self) -> Path:
        return self.engine.model_dir

    @property
    def separate_engines(self) -> bool:
        """The engine runs in processes of its own behind this front (server/dp.py)."""
        return self.data_parallel_size > 1 or self.engine_process

    def memory_dirs(self) -> dict[str, str]:
        """--memories as {name: directory}; ValueError naming a malformed or repeated one."""
        out: dict[str, str] = {}
        items = [self.memories] if isinstance(self.memories, str) else self.memories or []
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--memories {item!r}: write NAME=DIR")
            if name in out or name in self.model_names:
                raise ValueError(f"--memories: the name {name!r} is used twice")
            out[name] = path
        return out

    @property
    def model_names(self) -> list[str]:
        """Every name the model answers to (vLLM's --served-model-name)."""
        if isinstance(self.served_model_name, str):  # ServerConfig.make(served_model_name="x")
            return [self.served_model_name]
        if self.served_model_name:
            return list(self.served_model_name)
        return [self.engine.model or "engram-stdlib"]

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @classmethod
    def make(cls, **settings) -> ServerConfig:
        """A config from flat settings (``model=..., port=...``), each routed to its dataclass."""
        engine_fields = EngineConfig.__dataclass_fields__
        eng = {k: v for k, v in settings.items() if k in engine_fields}
        own = {k: v for k, v in settings.items() if k not in engine_fields}
        return cls(engine=EngineConfig(**eng), **own)
