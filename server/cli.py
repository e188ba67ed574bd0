"""``engram-serve``: start the OpenAI-compatible server (every flag also as ENGRAM_<FLAG>)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import uvicorn

from models.checkpoint import DTYPES, default_model_dir
from models.config import ModelConfig
from offload.engine import default_placement
from offload.prefetch import GATHERS, resolve_gather
from offload.store import Placement, cupy_ok

from .app import ServerConfig, create_app

LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="engram-serve",
        description="OpenAI-compatible server for Engram models (flags also read ENGRAM_<FLAG>).",
    )
    add = ap.add_argument
    add("--model", help="checkpoint directory (default: the built-in stdlib model)")
    add("--served-model-name", help="model name clients use (default: from the directory)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--placement", choices=[p.value for p in Placement], help="where Engram tables live")
    add("--gather", default="auto", choices=GATHERS, help="how rows reach the compute device")
    add("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    add("--dtype", default="float32", choices=list(DTYPES))
    add("--max-num-seqs", type=int, default=32)
    add("--max-num-batched-tokens", type=int, default=1024)
    add("--max-queue", type=int, default=256, help="sequences allowed to wait before 429")
    add("--kv-blocks", type=int, default=0, help="KV blocks of 16 tokens (0: fit max-num-seqs)")
    add("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    add("--max-body-bytes", type=int, default=1 << 20)
    add("--bench-result", help="engram-bench JSON shown by GET /v1/offload")
    add("--log-level", default="info", choices=LOG_LEVELS)
    add("--dedup", action="store_true", help="fetch each distinct row once per step")
    return ap


def env_argv(ap: argparse.ArgumentParser) -> list[str]:
    """ENGRAM_<FLAG> variables as command-line words, so argparse checks their types and
    choices like any flag's. Empty ones count as unset (what compose passes for unset)."""
    out = []
    for action in ap._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        raw = os.environ.get("ENGRAM_" + flag[2:].upper().replace("-", "_"), "").strip()
        if not raw:
            continue
        if action.nargs == 0:  # a switch
            if raw.lower() in ("1", "true", "yes", "on"):
                out.append(flag)
        else:
            out += [flag, raw]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Environment first, then the command line: a flag given on the line wins."""
    ap = build_parser()
    return ap.parse_args(env_argv(ap) + list(sys.argv[1:] if argv is None else argv))


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
    if args.kv_blocks < 0:
        return "--kv-blocks must be 0 (fit --max-num-seqs) or more"
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return f"--device {args.device} is not a device; use cpu, cuda or cuda:N"
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        return f"--device {args.device} needs CUDA, which this machine or torch build lacks"
    if args.bench_result:
        try:
            json.loads(Path(args.bench_result).read_text())
        except (OSError, ValueError) as e:
            return f"--bench-result {args.bench_result} is not a readable JSON file ({e})"
    if args.placement in ("host", "gpu") and not cuda:
        return f"--placement {args.placement} needs a CUDA device; use --placement cpu here"
    if args.placement == "host" and not cupy_ok():
        return "--placement host needs CuPy: pip install 'engram-serve[gpu]'"
    placement = Placement(args.placement) if args.placement else default_placement(device)
    try:
        resolve_gather(placement, args.gather)
    except ValueError as e:
        return f"--gather: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
