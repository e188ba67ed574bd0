"""What the data-parallel front and its engine processes say to each other over ZeroMQ.

Every message is one msgpack map with an ``op``. Front -> engine: ``add`` (rid, prompt_ids,
params), ``abort`` (rid), ``drain`` (message: end the requests not yet scheduled), ``stop``.
Engine -> front: ``ready`` (limits, what the tables did), ``failed`` (error), ``step`` (every
delta of one engine step, each a list: see :func:`delta_entry`; one message per step, not per
delta, so the front's socket thread and event loop wake once a step), ``metrics`` (its
Prometheus text), ``offload`` (its GET /v1/offload, as JSON text).
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
    return None if lp is None else [lp.token_id, lp.logprob, lp.top, lp.rank]


def _lp_from_wire(x) -> TokenLogprobs | None:
    return None if x is None else TokenLogprobs(x[0], x[1], [tuple(t) for t in x[2]], x[3])


def delta_entry(rid: str, d: Delta, prompt_logprobs: list | None = None) -> list:
    """One delta of a ``step`` message: its request's front id, the :class:`Delta`'s fields
    in order, then the choice's prompt logprobs (sent with its first delta, else None)."""
    lps = [_lp_to_wire(x) for x in d.logprobs]
    plp = None if prompt_logprobs is None else [_lp_to_wire(x) for x in prompt_logprobs]
    return [
        rid,
        d.choice,
        d.text,
        d.token_ids,
        lps,
        d.finish_reason,
        d.error,
        d.bad_params,
        d.unavailable,
        plp,
    ]


def entry_delta(e: list) -> tuple[str, Delta, list | None]:
    """:func:`delta_entry` read back: (front id, delta, prompt logprobs or None)."""
    rid, choice, text, ids, lps, finish, error, bad, unavailable, plp = e
    d = Delta(choice, text, ids, [_lp_from_wire(x) for x in lps], finish, error, bad, unavailable)
    return rid, d, None if plp is None else [_lp_from_wire(x) for x in plp]
