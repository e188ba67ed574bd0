"""``engram-serve``: start the OpenAI-compatible server (every flag also as ENGRAM_<FLAG>)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys

import torch
import uvicorn

from models.checkpoint import DTYPES, default_model_dir
from models.config import ModelConfig
from offload.engine import default_placement
from offload.prefetch import GATHERS, valid_gathers
from offload.store import Placement, cupy_ok

from .app import ServerConfig, create_app

LOG_LEVELS = ("debug", "info", "warning", "error")


def _env(name: str, default=None, cast=str):
    raw = os.environ.get("ENGRAM_" + name.upper().replace("-", "_"))
    if raw is None:
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return cast(raw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="engram-serve",
        description="OpenAI-compatible server for Engram models (flags also read ENGRAM_<FLAG>).",
    )

    def add(flag, cast=str, default=None, **kw):
        name = flag.lstrip("-")
        ap.add_argument(flag, type=cast, default=_env(name, default, cast), **kw)

    add("--model", help="checkpoint directory (default: the built-in stdlib model)")
    add("--served-model-name", help="model name clients use (default: from the directory)")
    add("--host", default="127.0.0.1")
    add("--port", int, 8000)
    add("--placement", choices=[p.value for p in Placement], help="where Engram tables live")
    add("--gather", default="auto", choices=GATHERS, help="how rows reach the compute device")
    add("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    add("--dtype", default="float32", choices=list(DTYPES))
    add("--max-num-seqs", int, 32)
    add("--max-num-batched-tokens", int, 1024)
    add("--max-queue", int, 256, help="sequences allowed to wait before 429")
    add("--kv-blocks", int, 0, help="KV cache blocks of 16 tokens (0: fit max-num-seqs)")
    add("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    add("--max-body-bytes", int, 1 << 20)
    add("--bench-result", help="engram-bench JSON shown by GET /v1/offload")
    add("--log-level", default="info", choices=LOG_LEVELS)
    ap.add_argument("--dedup", action="store_true", default=_env("dedup", False, bool))
    return ap


def validate(args: argparse.Namespace) -> str | None:
    """A one-line reason the settings cannot work, or None."""
    model_dir = args.model or str(default_model_dir())
    if not os.path.isdir(model_dir):
        return f"model directory {model_dir} does not exist; pass --model DIR with a checkpoint"
    try:
        ModelConfig.load(model_dir)
    except ValueError as e:
        return f"bad model directory {model_dir}: {e}"
    for flag in ("max_num_seqs", "max_num_batched_tokens", "max_queue", "max_body_bytes"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1"
    if not 0 < args.port < 65536:
        return f"--port {args.port} is not a valid port"
    cuda = (args.device or "").startswith("cuda") or (args.device is None and cupy_ok())
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.placement in ("host", "gpu") and not cuda:
        return f"--placement {args.placement} needs a CUDA device; use --placement cpu here"
    if args.placement == "host" and not cupy_ok():
        return "--placement host needs CuPy: pip install 'engram-serve[gpu]'"
    placement = Placement(args.placement) if args.placement else default_placement(device)
    ok = ("auto", *valid_gathers(placement))
    if args.gather not in ok:
        return (
            f"--gather {args.gather} does not work with placement {placement.value}; "
            f"use one of {', '.join(ok)}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = validate(args)
    if problem:
        print(f"engram-serve: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        placement=args.placement,
        gather=args.gather,
        dedup=args.dedup,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue=args.max_queue,
        kv_blocks=args.kv_blocks,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        bench_result=args.bench_result,
        log_level=args.log_level,
    )
    app = create_app(cfg)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=30,
    )
    server = GracefulServer(config)
    state = app.state.server
    state.on_load_error = server.fail  # a server that cannot load exits instead of idling at 503
    server.run()
    if server.exit_code:
        print(f"engram-serve: error: model load failed: {state.load_error}", file=sys.stderr)
    return server.exit_code


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but SIGINT/SIGTERM end in exit status 0 after the graceful shutdown
    (stock uvicorn re-raises the signal once done, which makes the status 128+N)."""

    exit_code = 0

    def fail(self) -> None:
        """From any thread: shut down gracefully and exit with status 1."""
        self.exit_code = 1
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
