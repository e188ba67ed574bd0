"""Server settings: the HTTP side's own fields plus the engine's (:class:`EngineConfig`).

Defaults live here and in ``EngineConfig`` only; ``engram-serve``'s flags and ``ENGRAM_*``
variables are built from both dataclasses (see cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig, flag

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerConfig:
    served_model_name: str | None = flag(
        None, "model name clients send and /v1/models lists (default: from the directory)"
    )
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "port to listen on")
    api_key: str | None = flag(
        None,
        "require 'Authorization: Bearer KEY' on /v1 routes and the tokenizer endpoints "
        "(default: no key)",
    )
    max_body_bytes: int = flag(1 << 20, "larger request bodies get 413")
    bench_result: str | None = flag(
        None, "engram-bench JSON shown by GET /v1/offload (default: none)"
    )
    log_level: str = flag("info", "log level", choices=list(LOG_LEVELS))
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def model_dir(self) -> Path:
        return self.engine.model_dir

    @property
    def model_name(self) -> str:
        return self.served_model_name or (
            "engram-stdlib" if not self.engine.model else Path(self.engine.model).resolve().name
        )

    @classmethod
    def make(cls, **settings) -> ServerConfig:
        """A config from flat settings (``model=..., port=...``), each routed to its dataclass."""
        engine_fields = EngineConfig.__dataclass_fields__
        eng = {k: v for k, v in settings.items() if k in engine_fields}
        own = {k: v for k, v in settings.items() if k not in engine_fields}
        return cls(engine=EngineConfig(**eng), **own)
