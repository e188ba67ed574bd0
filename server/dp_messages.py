"""What the data-parallel front and its engine processes say to each other over ZeroMQ.

Every message is one msgpack map with an ``op``. Front -> engine: ``add`` (rid, prompt_ids,
params), ``abort`` (rid), ``stop``. Engine -> front: ``ready`` (limits, what the tables did),
``failed`` (error), ``delta`` (rid + a :class:`Delta`), ``metrics`` (its Prometheus text),
``offload`` (its GET /v1/offload, as JSON text).
"""

from __future__ import annotations

import dataclasses

import msgpack

from engine.async_engine import Delta
from engine.sampling import SamplingParams, TokenLogprobs


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def params_to_wire(p: SamplingParams) -> dict:
    return dataclasses.asdict(p)


def params_from_wire(d: dict) -> SamplingParams:
    return SamplingParams(**d)


def _lp_to_wire(lp: TokenLogprobs | None):
    return None if lp is None else dataclasses.asdict(lp)


def _lp_from_wire(d):
    if d is None:
        return None
    return TokenLogprobs(d["token_id"], d["logprob"], [tuple(t) for t in d["top"]], d["rank"])


def delta_to_wire(rid: str, d: Delta) -> dict:
    out = dataclasses.asdict(d) | {"logprobs": [_lp_to_wire(x) for x in d.logprobs]}
    return {"op": "delta", "rid": rid, **out}


def delta_from_wire(msg: dict) -> Delta:
    fields = {f.name for f in dataclasses.fields(Delta)}
    d = Delta(**{k: v for k, v in msg.items() if k in fields})
    d.logprobs = [_lp_from_wire(x) for x in d.logprobs]
    return d
