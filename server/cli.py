"""``engram-serve``: start the OpenAI-compatible server (every flag also as ENGRAM_<FLAG>).

The flags are built from the settings dataclasses (:class:`ServerConfig`, :class:`EngineConfig`):
name, type, default, choices and help all come from the field.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
import uvicorn

from engine.config import EngineConfig
from engine.determinism import set_deterministic
from models.config import ModelConfig, cap_context
from offload.paths import SettingError, cores, resolve

from .app import create_app
from .chat import read_template_file
from .config import ServerConfig
from .launch import SignalLatch

log = logging.getLogger("engram.server")

TYPES = {"int": int, "float": float, "str": str, "list[str]": str}


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help; a help text that already says its default keeps it."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class HealthChecksAtDebug(logging.Filter):
    """uvicorn's access line for GET /health at debug level: load balancers and orchestrators
    poll it every few seconds, which would bury the requests that matter at info."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and str(args[2]).split("?")[0] == "/health":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _cli_fields(cls) -> list[dataclasses.Field]:
    return [
        f for f in dataclasses.fields(cls) if "help" in f.metadata and f.metadata.get("cli", True)
    ]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="engram-serve",
        description="OpenAI-compatible server for Engram models (flags also read ENGRAM_<FLAG>).",
        formatter_class=HelpWithDefaults,
    )
    for f in _cli_fields(EngineConfig) + _cli_fields(ServerConfig):
        name = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type == "bool":  # a switch; one that defaults on is turned off with --no-NAME
            off = f.default is True
            flag = "--no-" + name[2:] if off else name
            action = "store_false" if off else "store_true"
            # --no-NAME says what it does, not what NAME does (its default)
            text = meta["off_help"] if off else meta["help"]
            ap.add_argument(flag, dest=f.name, action=action, help=text)
            continue
        kind = TYPES[f.type.split(" |")[0]]
        extra = {k: meta[k] for k in ("nargs", "metavar") if k in meta}
        ap.add_argument(
            name,
            type=kind,
            default=f.default,
            choices=meta.get("choices"),
            help=meta["help"],
            **extra,
        )
    return ap


def env_argv(ap: argparse.ArgumentParser) -> list[str]:
    """ENGRAM_<FLAG> variables as command-line words, so argparse checks their types and
    choices like any flag's. Empty ones count as unset (what compose passes for unset)."""
    out = []
    for action in ap._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        raw = os.environ.get("ENGRAM_" + action.dest.upper(), "").strip()
        if not raw:
            continue
        if action.nargs == 0:  # a switch: ENGRAM_DEDUP=1 turns it on, ENGRAM_HUGE_PAGES=0 off
            on = raw.lower() in ("1", "true", "yes", "on")
            if on != isinstance(action, argparse._StoreFalseAction):
                out.append(flag)
        elif action.nargs == "+":  # ENGRAM_SERVED_MODEL_NAME="a b": two names
            out += [flag, *raw.split()]
        else:
            out += [flag, raw]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Environment first, then the command line: a flag given on the line wins."""
    ap = build_parser()
    return ap.parse_args(env_argv(ap) + list(sys.argv[1:] if argv is None else argv))


def to_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig.make(**vars(args))


def validate(args: argparse.Namespace) -> str | None:
    """A one-line reason the settings cannot work, or None."""
    cfg = to_config(args)
    model_dir = cfg.model_dir
    if not model_dir.is_dir():
        return f"model directory {model_dir} does not exist; pass --model DIR with a checkpoint"
    try:
        model_cfg = ModelConfig.load(model_dir)
        cap_context(model_cfg, cfg.engine.max_model_len)
    except ValueError as e:
        return f"bad model directory {model_dir}: {e}"
    try:
        read_template_file(cfg.chat_template)
    except (OSError, ValueError) as e:
        return str(e)
    try:
        cfg.engine.check()
    except ValueError as e:
        return str(e)
    bad = sorted(set(cfg.engine.file_layer_ids() or ()) - set(model_cfg.engram_layer_ids))
    if bad:
        return f"--file-layers {bad}: not Engram layers of the model ({model_cfg.engram_layer_ids})"
    if cfg.max_body_bytes < 1:
        return "--max-body-bytes must be at least 1"
    if cfg.shutdown_timeout < 0:
        return "--shutdown-timeout must be 0 (end running requests at once) or more seconds"
    if cfg.data_parallel_size < 1:
        return "--data-parallel-size must be at least 1"
    try:
        memories = cfg.memory_dirs()
    except ValueError as e:
        return str(e)
    if cfg.separate_engines and (memories or cfg.allow_memory_updates):
        return (
            "--memories and --allow-memory-updates are not supported with engine processes "
            "yet (--data-parallel-size above 1, --engine-process): serve memories from the "
            "server's own engine"
        )
    for name, path in memories.items():
        if not Path(path).is_dir():
            return f"--memories {name}={path}: the directory does not exist"
    if cfg.cpu_threads < 0:
        return "--cpu-threads must be 0 (all cores but one) or more"
    if not 0 < cfg.port < 65536:
        return f"--port {cfg.port} is not a valid port"
    if cfg.bench_result:
        try:
            json.loads(Path(cfg.bench_result).read_text())
        except (OSError, ValueError) as e:
            return f"--bench-result {cfg.bench_result} is not a readable JSON file ({e})"
    try:
        resolve(cfg.engine.device, cfg.engine.placement, cfg.engine.gather)
    except SettingError as e:
        return str(e)
    return None


def cpu_threads(requested: int) -> tuple[int, str]:
    """torch's CPU thread count and why: ``requested``, or one per core less one, so the HTTP
    loop and the row worker have a core and torch's threads never wait on a busy one."""
    n = cores()
    if requested:
        return requested, f"--cpu-threads {requested}; {n} cores"
    return max(1, n - 1), f"{n} cores, one left for the HTTP loop and the row worker"


def http_stack() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools (C) where installed (they are
    dependencies; a platform without wheels falls back), else asyncio's loop and h11."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads: a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None, latch: SignalLatch | None = None) -> int:
    """Exit status: 0 after a clean shutdown (a signal included), 1 when the settings cannot
    work or the model fails to load, 2 for a command line argparse cannot read."""
    latch = latch or SignalLatch().install()
    args = parse_args(argv)
    problem = validate(args)
    if problem:
        print(f"engram-serve: error: {problem}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = to_config(args)
    if latch.count:
        log.info("%s before start-up: exiting", latch.name)
        return 0
    try:
        sock = listen(cfg.host, cfg.port)
    except OSError as e:
        print(
            f"engram-serve: error: cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); "
            "pass another --port or stop what uses it",
            file=sys.stderr,
        )
        return 1
    threads, why = cpu_threads(cfg.cpu_threads)
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d (%s)", threads, why)
    if cfg.engine.deterministic:  # before anything touches CUDA (see engine/determinism.py)
        set_deterministic(True)
    app = create_app(cfg)
    loop, http = http_stack()
    log.info("HTTP: %s event loop, %s parser", loop, http)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        loop=loop,
        http=http,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=10,  # after the drain: responses still being written
    )
    logging.getLogger("uvicorn.access").addFilter(HealthChecksAtDebug())  # after uvicorn's config
    state = app.state.server
    server = GracefulServer(config, latch, lambda: state.drain(cfg.shutdown_timeout))
    state.on_load_error = server.fail  # a server that cannot load exits instead of idling at 503
    server.run(sockets=[sock])
    if server.exit_code:
        print(f"engram-serve: error: model load failed: {state.load_error}", file=sys.stderr)
    if state.loader is not None and state.loader.is_alive():
        # loading is stuck inside one phase (e.g. a huge table copy): tearing the interpreter
        # down under it can crash inside CUDA, so leave without teardown; nothing is on disk
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(server.exit_code)
    return server.exit_code


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown: on the first SIGINT/SIGTERM (counted
    by the latch from process start), ``drain`` runs while the socket still answers (new
    requests get 503), then uvicorn shuts down and the process exits with status 0 (stock
    uvicorn closes the socket at once and re-raises the signal: status 128+N)."""

    exit_code = 0

    def __init__(
        self, config: uvicorn.Config, latch: SignalLatch, drain: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(config)
        self.latch, self.drain = latch, drain
        self._draining: asyncio.Future | None = None

    def fail(self) -> None:
        """From any thread: shut down gracefully and exit with status 1."""
        self.exit_code = 1
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the latch has caught them since the process started; it stays installed

    async def on_tick(self, counter: int) -> bool:
        if self.latch.count and self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        log.info("%s: shutting down gracefully; a second signal exits now", self.latch.name)
        try:
            await self.drain()
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
