"""The HTTP surface: OpenAI's completions API as vLLM serves it, health, version, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AsyncEngine
from engine.kernel_check import KernelCheckError, Kernels, check_kernels
from engine.kernel_check import summary as kernel_summary
from engine.memories import BadMemory, Memory, MemoryLoader, memory_format
from models.config import ModelConfig, cap_context
from models.hf_files import GenerationDefaults, TokenizerFiles
from models.safetensors_header import TableFileError
from offload.hot_cache import HotCacheError
from offload.link import measure_copy_bandwidth
from offload.offloaded_model import OffloadedModel

from .chat import ChatCompletion, model_template, no_template, read_template_file
from .chat_protocol import ChatCompletionRequest
from .completions import Completion, shutting_down, wait_or_disconnect
from .config import ServerConfig
from .fast import FastRoute
from .memories import (
    Loading,
    attach_startup_memories,
    check_served_memory,
    plain_base_memory,
)
from .memories import describe as describe_memories
from .memories import router as memories_router
from .memories import updates as memory_updates_router
from .metrics import Metrics
from .middleware import Gate, error_response, needs_key
from .openapi import (
    STREAM,
    ChatCompletionResponse,
    CompletionResponse,
    Health,
    Limits,
    ModelCard,
    ModelList,
    Version,
    describe,
    errors,
)
from .protocol import APIError, CompletionRequest, validation_error
from .sse import App, EventStream
from .startup import (
    LINK_BYTES,
    LoadCancelled,
    StartupClock,
    forget_steps,
    load_offload,
    warm_up,
)
from .tokenization import router as tokenization_router

log = logging.getLogger("engram.server")


def package_version() -> str:
    try:
        return version("engram-serve")
    except PackageNotFoundError:
        return "0.0.0"


def request_limits(cfg: ServerConfig, model: ModelConfig) -> Limits:
    """The limits the settings and the model's config set (known before the model loads)."""
    e = cfg.engine
    context = model.max_position_embeddings
    pool = e.num_kv_blocks(context) * e.block_size  # the engine's max_tokens_per_seq
    return Limits(model.vocab_size, min(context, pool), e.max_num_seqs, e.max_queue)


class ServerState:
    """Loads the model in the background so /health can answer 503 until it is ready."""

    def __init__(
        self,
        cfg: ServerConfig,
        offload: OffloadedModel | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        """``kernels``: the attention kernels the start-up check runs against the reference
        (default: the serving path's)."""
        self.cfg = cfg
        self.kernels = kernels
        self.sampling_defaults: dict = {}
        self.chat_template = read_template_file(cfg.chat_template)  # the CLI checked it
        try:
            model = offload.model.config if offload else ModelConfig.load(cfg.model_dir)
            cap_context(model, cfg.engine.max_model_len)
            self.limits: Limits | None = request_limits(cfg, model)
            if offload is None:
                self.sampling_defaults = GenerationDefaults.read(cfg.model_dir).sampling
        except ValueError:  # the load fails too and says why (/health, the CLI's exit)
            self.limits = None
        self.metrics = Metrics(
            cfg.model_name,
            names=cfg.metrics_names,
            max_model_len=self.limits.max_model_len if self.limits else 2048,
        )
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.on_load_error: Callable[[], None] | None = None
        self.link_bps = 0.0
        self.started = time.time()
        self.startup = StartupClock()
        self.loader: threading.Thread | None = None
        self.draining = False
        self._offload = offload
        self.memory_loader: MemoryLoader | None = None  # set once the base has loaded
        self.memory_loading = Loading()

    def start_loading(self) -> None:
        self.loader = threading.Thread(target=self.load, name="engram-load", daemon=True)
        self.loader.start()

    def load(self) -> None:
        if self.cfg.separate_engines:  # engine processes behind this front
            from .dp import load_data_parallel

            return load_data_parallel(self)
        clock, built = self.startup, None
        try:
            e = self.cfg.engine
            # a base without Engram layers serves its first memory's layers (engine/memories.py)
            plain = None if self._offload is not None else plain_base_memory(self.cfg)
            offload = self._offload or self._load_offload(clock, plain and plain[1])
            built = offload if self._offload is None else None
            if plain is not None:
                check_served_memory(self.cfg, offload, plain[0])
            cap_context(offload.model.config, e.max_model_len)
            if offload.file_tier is not None:  # refuse a DRAM cache two steps can overflow
                heads = offload.model.config.engram_total_heads
                offload.file_tier.check_capacity(e.max_num_batched_tokens * heads)
            with clock.phase("link measurement"):
                self.link_bps = measure_copy_bandwidth(offload.device, LINK_BYTES)
            with clock.phase("engine"):  # the KV cache, and CUDA graphs captured on a GPU
                engine = AsyncEngine(offload, e, self.metrics)
            with clock.phase("warm-up"):  # compiles every kernel the check runs
                warm_up(engine)
            with clock.phase("kernel check"):
                checked = check_kernels(engine.engine, self.kernels)
            self.memory_loader = MemoryLoader(offload, self._place_tables)
            if plain is not None:
                engine.memories.plain_base(plain[0], plain[1], memory_format(plain[1]))
                self.memory_loader.versions[plain[0]] = 1  # a reload of it is version 2
                self.metrics.watch_memory(engine.memories.current[plain[0]])
            self.metrics.watch_memory(engine.memories.base)
            with clock.phase("memories"):
                attach_startup_memories(self, engine, self.memory_loader, skip=plain)
            forget_steps(offload.accountant)  # the check's gathers are not traffic
            log.info("%s", kernel_summary(checked))
            self.metrics.set_offload_static(offload.tier_bytes(), self.link_bps)
            tier = "file" if offload.file_tier is not None else offload.placement.value
            self.metrics.watch_offload(
                offload.accountant,
                offload.model.config.engram_layer_ids,
                tier,
                sorted(offload.hot.caches) if offload.hot else [],
            )
            clock.check()
            engine.start()
            self.engine = engine
            log.info("%s", self.summary_line())
            log.info("%s", clock.line())
        except LoadCancelled as e:
            log.warning("%s; stopped loading", e)
            if built is not None:
                built.close()
        except (
            KernelCheckError,
            TableFileError,
            HotCacheError,
            BadMemory,
        ) as e:  # one line says it all (the kernel or
            # the file's tensor, what is wrong, what to do)
            log.error("%s", e)
            self.load_error = str(e)
            if built is not None:
                built.close()
            if self.on_load_error is not None:
                self.on_load_error()
        except Exception as e:  # reported by /health and the CLI
            log.exception("model load failed")
            self.load_error = f"{type(e).__name__}: {e}"
            if self.on_load_error is not None:
                self.on_load_error()

    def _place_tables(self, model_dir, loaded) -> OffloadedModel:
        """An Engram memory's tables in the tiers and gather path the base's use."""
        return self._load_offload(StartupClock(), model_dir, loaded)

    def _load_offload(self, clock: StartupClock, model_dir=None, loaded=None) -> OffloadedModel:
        progress = sys.stderr.isatty() and loaded is None
        return load_offload(self.cfg.engine, clock.phase, model_dir, loaded, progress)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: admit nothing more (503 with Retry-After), end the queued
        requests with a 503 now, give the running ones ``timeout`` seconds, then end what is
        left with an error (streams: an error event and [DONE]; KV memory freed)."""
        self.draining = True
        self.startup.cancel.set()  # a load in progress stops at its next phase boundary
        engine = self.engine
        if engine is None:
            return
        engine.drain("the server is shutting down; retry on another replica")
        deadline = time.monotonic() + timeout
        log.info("draining: %d requests open, up to %.0fs to finish", len(engine.requests), timeout)
        while engine.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.busy:
            log.warning(
                "shutdown timeout (%.0fs): ending %d requests still running",
                timeout,
                len(engine.requests),
            )
            engine.cut(f"the server shut down before this request finished ({timeout:.0f}s)")
            while engine.busy and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.02)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop loading (at its next phase boundary) and the engine. False when the loader was
        still busy after ``timeout`` seconds (the caller must then exit without teardown)."""
        self.startup.cancel.set()
        if self.loader is not None:
            self.loader.join(timeout)
            if self.loader.is_alive():
                log.error(
                    "loading (%s) did not stop within %.0fs of shutdown",
                    self.startup.current,
                    timeout,
                )
                return False
        if self.engine is not None:
            self.engine.stop()
        return True

    def summary_line(self) -> str:
        e = self.engine
        tiers = (
            ", ".join(f"{k}={v / 2**20:.1f} MiB" for k, v in e.offload.tier_bytes().items() if v)
            or "none (no Engram layers)"
        )
        return (
            f"model {self.cfg.model_name} ({self.cfg.model_dir}) on {e.offload.device}, "
            f"dtype {e.offload.dtype or e.offload.model.lm_head.weight.dtype}; "
            f"Engram tables: {tiers} (placement {e.offload.placement.value}, "
            f"gather {e.offload.gather}); KV cache {e.cache.nbytes() / 2**20:.1f} MiB; "
            f"link {self.link_bps / 1e9:.1f} GB/s"
        )

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None:
            msg = self.load_error or "the model is still loading"
            raise APIError(503, msg, None, "model_not_ready")
        return self.engine


def offload_description(state: ServerState) -> dict:
    """GET /v1/offload of one engine: placement, gather path, tiers, caches, accounting."""
    cfg, e = state.cfg, state.ready_engine()
    bench = None
    if cfg.bench_result and Path(cfg.bench_result).is_file():
        bench = json.loads(Path(cfg.bench_result).read_text())
    return {
        "model": cfg.model_name,
        "device": str(e.offload.device),
        "placement": e.offload.placement.value,
        "gather": e.offload.gather,
        "dedup": e.offload.prefetcher.dedup,
        "table_bytes": e.offload.tier_bytes(),
        "file_tier": e.offload.file_tier.describe() if e.offload.file_tier else None,
        "tables": e.offload.store.describe(),
        "hot_cache": e.offload.hot.describe() if e.offload.hot else None,
        "link_bandwidth_bytes_per_second": state.link_bps,
        "stall_fraction": e.offload.accountant.stall_fraction,
        "accounting": e.offload.accountant.summary(),
        "memories": describe_memories(e.memories.snapshot(), cfg.model_name),
        "last_bench": bench,
    }


def create_app(
    cfg: ServerConfig, offload: OffloadedModel | None = None, kernels: Kernels | None = None
) -> FastAPI:
    """``kernels``: what the start-up kernel check runs (default: the serving kernels)."""
    state = ServerState(cfg, offload, kernels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await asyncio.to_thread(state.shutdown)

    app = App(title="engram-serve", version=package_version(), lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e, state.metrics)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(validation_error(list(e.errors())), state.metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):  # 404, 405 (with Allow)
        err = APIError(e.status_code, str(e.detail), headers=dict(e.headers or {}))
        return error_response(err, state.metrics)

    def memory_names() -> list[str]:
        memories = getattr(state.engine, "memories", None)  # none under data parallel
        return memories.names() if memories is not None else []

    def check_model(name: str | None) -> str | None:
        """The Engram memory a request's model names (None: the base); 404 if neither."""
        if name is None or name in cfg.model_names:
            return None
        if name in memory_names():
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    # HEAD as well as GET on /health and /metrics: probes (aiperf's among them) use it
    @app.head("/health", operation_id="head_health", responses={503: {"model": Health}})
    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health}})
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining", "error": None}, status_code=503)
        if state.engine is None:
            return JSONResponse(
                {"status": "error" if state.load_error else "loading", "error": state.load_error},
                status_code=503,
            )
        if hasattr(state.engine, "health"):  # data parallel: each engine's state
            return {"status": "ok", "engines": state.engine.health()}
        return {"status": "ok"}

    @app.get("/version", responses={200: {"model": Version}})
    async def get_version():
        return {"version": package_version()}

    @app.head("/metrics", operation_id="head_metrics", response_class=PlainTextResponse)
    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str, memory: Memory | None = None) -> dict:
        """A base name's card, or a memory's with ``parent`` the base (as vLLM lists LoRA
        adapters)."""
        return {
            "id": name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "engram-serve",
            "root": memory.path if memory else str(cfg.model_dir),
            "parent": cfg.model_name if memory else None,
            "max_model_len": state.engine.max_tokens_per_seq if state.engine else None,
        }

    def cards() -> list[dict]:
        out = [model_card(n) for n in cfg.model_names]
        mem = getattr(state.engine, "memories", None)
        if mem is not None:
            out += [model_card(m.name, m) for m in mem.snapshot() if not m.base and not m.retired]
        return out

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def list_models():
        return {"object": "list", "data": cards()}

    @app.get(
        "/v1/models/{model}",
        responses={200: {"model": ModelCard}, **errors(404)},
    )
    async def retrieve_model(model: str):
        check_model(model)
        return next(c for c in cards() if c["id"] == model)

    @app.get("/v1/offload", responses=errors(503))
    async def offload_info():
        e = state.ready_engine()
        engines = getattr(e, "offload_infos", None)
        if engines is not None:  # --data-parallel-size: what each engine process reported
            return {"model": cfg.model_name, "data_parallel_size": len(e.engines), **engines()}
        return offload_description(state)

    def admit(body: CompletionRequest | ChatCompletionRequest) -> tuple[AsyncEngine, str | None]:
        """What every generation request passes first: its model, its fields, not draining.
        Returns the engine and the Engram memory the model names (None: the base)."""
        memory = check_model(body.model)
        body.check()
        if state.draining:
            raise shutting_down("the server is shutting down; retry on another replica")
        return state.ready_engine(), memory

    @app.post(
        "/v1/completions",
        responses={
            200: {"model": CompletionResponse, "content": STREAM},
            **errors(404, 429, 503),
        },
    )
    async def completions(body: CompletionRequest, request: Request):
        engine, memory = admit(body)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send token-id prompts", "prompt")
        comp = Completion(engine, body, memory or cfg.model_name, state.sampling_defaults)
        comp.memory = memory
        comp.submit()
        if body.stream:
            return EventStream(comp.stream(), comp.gone)
        result = await wait_or_disconnect(request, comp.collect())
        if result is None:  # the client went away: free its slot and KV memory now
            comp.abort()
            return Response(status_code=499)
        return result

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {"model": ChatCompletionResponse, "content": STREAM},
            **errors(400, 404, 429, 503),
        },
    )
    async def chat(body: ChatCompletionRequest, request: Request):
        engine, memory = admit(body)
        if engine.tokenizer is None:
            raise no_template(cfg.model_name)
        template = model_template(engine.tokenizer, state.chat_template)
        name = memory or cfg.model_name
        comp = ChatCompletion(engine, body, name, state.sampling_defaults, template)
        comp.memory = memory
        comp.req.check()
        comp.submit()
        if body.stream:
            return EventStream(comp.stream(), comp.gone)
        result = await wait_or_disconnect(request, comp.collect())
        if result is None:
            comp.abort()
            return Response(status_code=499)
        return result

    # vLLM's /tokenize, /detokenize, /tokenizer_info (behind the key here: vLLM leaves them open)
    app.include_router(tokenization_router)
    app.include_router(memories_router)
    if cfg.allow_memory_updates:  # vLLM: load_lora_adapter only with runtime updates allowed
        app.include_router(memory_updates_router)
    # the catch-all, then the key (before any body is read), then the body checks: one layer,
    # and the two generation routes straight to their handlers (fast.py)
    fast = {
        "/v1/completions": FastRoute(CompletionRequest, completions),
        "/v1/chat/completions": FastRoute(ChatCompletionRequest, chat),
    }
    app.add_middleware(
        Gate,
        api_key=cfg.api_key,
        limit=cfg.max_body_bytes,
        metrics=state.metrics,
        routes=fast if cfg.fast_routes else {},
    )

    def openapi() -> dict:
        if app.openapi_schema is None:
            has_template = state.chat_template is not None or (
                TokenizerFiles.read(cfg.model_dir).chat_template is not None
            )
            app.openapi_schema = describe(app, state.limits, needs_key, has_template)
        return app.openapi_schema

    app.openapi = openapi
    return app
