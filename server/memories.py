"""Engram memories over HTTP: ``GET /v1/memories``, and with ``--allow-memory-updates``
``POST /v1/memories`` (load; ``"reload": true`` replaces a loaded one) and
``DELETE /v1/memories/{name}``.

A load reads the checkpoint and places its tables on a worker thread, never the engine's:
steps go on meanwhile. The engine thread then swaps the new version in between two steps;
sequences already running keep the version they started with, and a replaced version is
freed after its last one. Every refusal (missing files, a base mismatch, a name in use, a
corrupt table, an unknown name) is an OpenAI-shaped 400 or 404 naming it, and leaves the
serving set as it was.
"""

from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from engine.async_engine import EngineDead
from engine.memories import BadMemory, Memory, MemoryLoader
from models.checkpoint import load_checkpoint
from models.config import ModelConfig
from models.memory import MemoryMismatch, check_backbone

from .openapi import errors
from .protocol import APIError


class LoadMemory(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    path: str
    reload: bool = False


class MemoryCard(BaseModel):
    name: str
    version: int
    path: str
    format: str
    base: bool
    active_sequences: int


class MemoryList(BaseModel):
    object: str
    data: list[dict]


def _bad(e: BadMemory) -> APIError:
    return APIError(e.status, str(e), "name" if e.status == 404 else "path", "memory_error")


class Loading:
    """Names being loaded or unloaded right now: a second load or an unload of one of them
    is refused, not raced (a DELETE during a reload would be undone by its install)."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, name: str) -> None:
        with self._lock:
            if name in self._names:
                raise BadMemory(f"memory {name!r} is being loaded or unloaded; retry after that")
            self._names.add(name)

    def drop(self, name: str) -> None:
        with self._lock:
            self._names.discard(name)


def check_name(state, name: str, reload: bool) -> None:
    """A name for a load: not the base's, in use only for a reload."""
    if not name or "/" in name or any(c.isspace() for c in name):
        raise BadMemory(f"memory name {name!r}: use a non-empty name without '/' or spaces")
    if name in state.cfg.model_names:
        raise BadMemory(f"memory name {name!r} is the served base model's name")
    loaded = name in state.engine.memories.names()
    if loaded and not reload:
        raise BadMemory(f'memory name {name!r} is in use; send "reload": true to replace it')
    if reload and not loaded:
        raise BadMemory(f"no memory named {name!r} is loaded to reload", 404)


def describe(memories: list[Memory], base_name: str) -> list[dict]:
    out = []
    for m in memories:
        d = m.describe()
        if m.base:
            d["name"] = base_name
        out.append(d)
    return out


router = APIRouter()


def _state(request: Request):
    return request.app.state.server


@router.get("/v1/memories", responses={200: {"model": MemoryList}, **errors(503)})
async def list_memories(request: Request):
    state = _state(request)
    memories = getattr(state.ready_engine(), "memories", None)  # none under data parallel
    data = describe(memories.snapshot(), state.cfg.model_name) if memories is not None else []
    return {"object": "list", "data": data}


updates = APIRouter()


@updates.post("/v1/memories", responses={200: {"model": MemoryCard}, **errors(400, 404, 503)})
async def load_memory(body: LoadMemory, request: Request):
    state = _state(request)
    engine = state.ready_engine()
    try:
        check_name(state, body.name, body.reload)
        state.memory_loading.claim(body.name)
    except BadMemory as e:
        raise _bad(e) from e
    try:
        memory = await asyncio.to_thread(state.memory_loader.load, body.name, body.path)
        state.metrics.watch_memory(memory)
        await asyncio.wrap_future(engine.install_memory(memory))
    except BadMemory as e:
        raise _bad(e) from e
    except EngineDead as e:
        raise APIError(503, str(e)) from e
    finally:
        state.memory_loading.drop(body.name)
    d = memory.describe()
    return {k: d[k] for k in MemoryCard.model_fields}


@updates.delete("/v1/memories/{name}", responses={200: {"model": MemoryCard}, **errors(404, 503)})
async def unload_memory(name: str, request: Request):
    state = _state(request)
    engine = state.ready_engine()
    try:
        state.memory_loading.claim(name)
    except BadMemory as e:
        raise _bad(e) from e
    try:
        memory = await asyncio.wrap_future(engine.remove_memory(name))
    except BadMemory as e:
        raise _bad(e) from e
    except EngineDead as e:
        raise APIError(503, str(e)) from e
    finally:
        state.memory_loading.drop(name)
    state.metrics.forget_memory(name)
    d = memory.describe()
    return {k: d[k] for k in MemoryCard.model_fields}


def plain_base_memory(cfg) -> tuple[str, str] | None:
    """For a base without Engram layers served with --memories: the first memory (name,
    directory), whose checkpoint the engine loads for the Engram layout; else None."""
    memories = cfg.memory_dirs()
    if not memories or ModelConfig.load(cfg.model_dir).engram_layer_ids:
        return None
    return next(iter(memories.items()))


def check_served_memory(cfg, served, name: str) -> None:
    """The first memory of a base without Engram layers is a checkpoint of that base."""
    dtype = served.model.lm_head.weight.dtype
    base, _ = load_checkpoint(cfg.model_dir, dtype=dtype, device="cpu", load_tables=False)
    try:
        check_backbone(base, served.model, name)
    except MemoryMismatch as e:
        raise BadMemory(str(e)) from e


def attach_startup_memories(state, engine, loader: MemoryLoader, skip=None) -> None:
    """--memories, loaded before the engine starts (a bad one stops the start-up); ``skip``:
    the one served as the model's own layers (a base without Engram layers)."""
    for name, path in state.cfg.memory_dirs().items():
        if skip is not None and name == skip[0]:
            continue
        memory = loader.load(name, path)
        engine.memories.install(memory)
        state.metrics.watch_memory(memory)
