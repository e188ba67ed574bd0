"""``engram-bench --http-cost``: what the HTTP layer costs at many streaming clients.

The same workload (C prompts, greedy, ``--max-tokens`` each, EOS ignored) runs two ways, in
interleaved rounds: on an :class:`engine.engine.Engine` in this process (the engine's direct
throughput), and through a real ``engram-serve`` process on a loopback port with C
concurrent streaming clients (httpx's async client, one connection pool each, all on one
asyncio loop in this process, so the clients' CPU is counted apart and stays small; each
keeps its connection between its ``--requests`` unless ``--new-connections``). Both run the
same engine: the direct one is built from the server's own flags (``--serve-args`` and the
ones this bench passes) by the loader the server uses (``server/startup.py``): same tiers,
gather path, threads and limits. Per round: tokens per second, and CPU seconds per token
(this process for the direct run; the server process and any it started, from /proc, for the
HTTP run: the engine's work plus the API's). The HTTP layer's share is ``1 - http tok/s /
direct tok/s``; its CPU per token is the difference of the two (also as a share of the
engine's own, the primary figure on a machine whose cores the clients share).

Results: ``httpcost.json`` with every round and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.engine import Engine
from engine.sampling import SamplingParams
from models.config import cap_context

from .http_plot import plot
from .provenance import environment
from .stats import summarize

PROG = "engram-bench --http-cost"
DEVICE_THREAD = "engram-device"  # engine/step_queue.py's worker: the forward pass, overlapped


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument(
        "--requests",
        type=int,
        default=1,
        help="requests per client per round, one after another (the direct engine runs the "
        "prompts as many times): short requests need many for the CPU clock's 10 ms ticks",
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--serve-args",
        default="",
        help='more engram-serve flags, one string (e.g. "--placement cpu --dedup"); the '
        "direct engine is built from the same flags",
    )
    conn = ap.add_mutually_exclusive_group()
    conn.add_argument(
        "--keep-alive",
        dest="new_connections",
        action="store_false",
        help="each client keeps its connection between its requests, as httpx and the "
        "openai client do (the default)",
    )
    conn.add_argument(
        "--new-connections",
        action="store_true",
        help="a new connection per request (the runs committed before keep-alive became "
        "the default)",
    )
    ap.set_defaults(new_connections=False)  # both flags write it: the default said once
    ap.add_argument("--out", default=None, help="output dir (default bench/results/DATE-cpu-http)")
    ap.add_argument("--no-plots", action="store_true", help="no httpcost.png")
    ap.add_argument(
        "--replot",
        metavar="DIR",
        default=None,
        help="draw DIR/httpcost.png again from DIR/httpcost.json, run nothing",
    )
    return ap


def _stat_ticks(path: str) -> list[int]:
    """The clock-tick fields of a /proc stat file (utime stime cutime cstime, from index 0)."""
    return [int(x) for x in Path(path).read_text().rsplit(")", 1)[1].split()[11:15]]


def _tree(pid: int) -> list[int]:
    """A process and every process under it (Linux /proc; the ones gone in between left out)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:  # it exited in between
            continue
        out.append(p)
        for t in tasks:
            try:
                todo += [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                pass
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and every process under it, the exited ones
    it has waited for included (Linux /proc)."""
    total = 0
    for p in _tree(pid):
        try:
            total += sum(_stat_ticks(f"/proc/{p}/stat"))
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _loop_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process's main thread: the server's event loop (the
    HTTP layer's own work; the engine steps on a thread of its own)."""
    utime, stime = _stat_ticks(f"/proc/{pid}/task/{pid}/stat")[:2]
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(pid: int, name: str, children: bool = True) -> float | None:
    """User + system CPU seconds of the threads with this OS name in a process and (with
    ``children``) those under it (``engram-device``: the step worker, where the forward pass
    runs with overlap on, in the engine's process); None where there is none."""
    total, found = 0, False
    for p in _tree(pid) if children else [pid]:
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:  # it exited in between
            continue
        for t in tasks:
            try:
                if (t / "comm").read_text().strip() != name:
                    continue
                total += sum(_stat_ticks(str(t / "stat"))[:2])
                found = True
            except OSError:  # it exited in between
                pass
    return total / os.sysconf("SC_CLK_TCK") if found else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_round(
    engine: Engine, prompts: list[list[int]], max_tokens: int, requests: int = 1
) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    c0, t0, tokens = time.process_time(), time.perf_counter(), 0
    d0 = _thread_cpu_s(os.getpid(), DEVICE_THREAD, children=False)
    for k in range(requests):
        seqs = [engine.add(f"d{k}-{i}", p, params)[0] for i, p in enumerate(prompts)]
        engine.run_until_done()
        tokens += sum(len(s.output_ids) for s in seqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    device = _minus(_thread_cpu_s(os.getpid(), DEVICE_THREAD, children=False), d0)
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "device_cpu_s": device}


async def _stream(client, url: str, model: str, prompt: list[int], max_tokens: int) -> int:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tail = b""  # the stream's last bytes: its usage event (read whole, parsed once)
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            tail = (tail + chunk)[-4096:]
    for event in reversed(tail.split(b"\n\n")):
        if event.startswith(b"data: {") and b'"usage"' in event:
            return json.loads(event[6:])["usage"]["completion_tokens"]
    raise RuntimeError("a stream ended without its usage event")


class Clients:
    """C streaming clients on one asyncio loop in this process (one thread: the clients' CPU
    is this process's, counted apart from the server's). Each client has its own connection
    pool of one, as each user of a server has its own: one pool shared by all C would cost
    the load generator O(C) work per request (httpx checks every pooled connection for
    expiry, a getpeername and a poll each) and, on a machine whose cores the clients share,
    slow the server it measures. A client keeps its connection between its requests unless
    ``new_connections`` (then every request connects anew); an idle one expires after
    ``KEEPALIVE_EXPIRY_S``, before the server's keep-alive timeout (5 s) could close it as
    it is reused."""

    KEEPALIVE_EXPIRY_S = 2.0

    def __init__(self, url: str, pid: int, clients: int, new_connections: bool) -> None:
        import httpx

        self.url, self.pid = url, pid
        self.loop = asyncio.new_event_loop()
        limits = httpx.Limits(
            max_connections=1,
            max_keepalive_connections=0 if new_connections else 1,
            keepalive_expiry=self.KEEPALIVE_EXPIRY_S,
        )
        self.clients = [httpx.AsyncClient(limits=limits, timeout=600) for _ in range(clients)]
        models = self.loop.run_until_complete(self.clients[0].get(url + "/v1/models"))
        self.model = models.json()["data"][0]["id"]

    def round(self, prompts: list[list[int]], max_tokens: int, requests: int = 1) -> dict:
        async def one(client, prompt: list[int]) -> int:
            got = 0
            for _ in range(requests):
                got += await _stream(client, self.url, self.model, prompt, max_tokens)
            return got

        async def go() -> dict:
            c0, p0, t0 = _cpu_s(self.pid), time.process_time(), time.perf_counter()
            l0, d0 = _loop_cpu_s(self.pid), _thread_cpu_s(self.pid, DEVICE_THREAD)
            got = await asyncio.gather(*(one(c, p) for c, p in zip(self.clients, prompts)))
            wall = time.perf_counter() - t0
            cpu, client_cpu = _cpu_s(self.pid) - c0, time.process_time() - p0
            loop = _loop_cpu_s(self.pid) - l0
            device = _minus(_thread_cpu_s(self.pid, DEVICE_THREAD), d0)
            return {
                "tokens": sum(got),
                "wall_s": wall,
                "cpu_s": cpu,
                "loop_cpu_s": loop,
                "device_cpu_s": device,
                "client_cpu_s": client_cpu,
            }

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        for c in self.clients:
            self.loop.run_until_complete(c.aclose())
        self.loop.close()


def serve_argv(args) -> list[str]:
    """The server's flags that decide its engine (the direct engine is built from these)."""
    return [
        "--max-num-seqs",
        str(args.clients),
        "--cpu-threads",
        str(args.threads),
        *shlex.split(args.serve_args),
    ]


def direct_engine(args) -> Engine:
    """The engine the server runs, from the server's own flags and loader, in this process."""
    from server.cli import parse_args, to_config  # the server's parser: its defaults, its checks
    from server.startup import load_offload

    e = to_config(parse_args(serve_argv(args))).engine
    offload = load_offload(e)
    cap_context(offload.model.config, e.max_model_len)
    engine = Engine(offload.model, e, offload.prefetcher, offload.tokenizer)
    engine.offload = offload  # closed with the engine, in run()
    return engine


def start_server(args) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.launch",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *serve_argv(args),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("engram-serve did not become healthy")


def run(args) -> dict:
    from server import cli  # the server's event loop and HTTP parser, recorded below

    torch.set_num_threads(args.threads)  # as the server sets it from --cpu-threads
    engine = direct_engine(args)
    gc.collect()  # as the server's engine thread starts: what is built so far is frozen
    gc.freeze()
    rng = np.random.default_rng(args.seed)
    vocab = engine.model.config.vocab_size
    prompts = [rng.integers(1, vocab, args.prompt_len).tolist() for _ in range(args.clients)]
    proc, url = start_server(args)
    rounds = {"direct": [], "http": []}
    clients = None
    try:
        clients = Clients(url, proc.pid, args.clients, args.new_connections)
        direct_round(engine, prompts, 4)  # warm-up, both ways
        clients.round(prompts, 4)
        for r in range(args.repeats):
            ways = ["direct", "http"] if r % 2 == 0 else ["http", "direct"]
            for way in ways:
                if way == "direct":
                    got = direct_round(engine, prompts, args.max_tokens, args.requests)
                else:
                    got = clients.round(prompts, args.max_tokens, args.requests)
                rounds[way].append(got)
                rate = got["tokens"] / got["wall_s"]
                print(f"round {r + 1}/{args.repeats} {way}: {rate:.0f} tok/s", file=sys.stderr)
    finally:
        if clients is not None:
            clients.close()
        proc.terminate()
        proc.wait(60)
        engine.close()
        engine.offload.close()
        gc.unfreeze()
    summary = {}
    for way, rs in rounds.items():
        summary[way] = {
            "tok_s": summarize([x["tokens"] / x["wall_s"] for x in rs]),
            "cpu_us_per_token": summarize([1e6 * x["cpu_s"] / x["tokens"] for x in rs]),
        }
    ratio = [
        h["tokens"] / h["wall_s"] / (d["tokens"] / d["wall_s"])
        for h, d in zip(rounds["http"], rounds["direct"])
    ]
    extra = [
        1e6 * (h["cpu_s"] / h["tokens"] - d["cpu_s"] / d["tokens"])
        for h, d in zip(rounds["http"], rounds["direct"])
    ]
    return {
        "kind": "http-cost",
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len,
        "requests_per_client": args.requests,
        "serve_args": serve_argv(args),
        "connections": "new per request" if args.new_connections else "kept per client",
        # the server's event loop and HTTP parser (asyncio/h11 where uvloop/httptools are
        # missing: a different, slower server)
        "http_stack": dict(zip(("loop", "http"), cli.http_stack())),
        "environment": environment(torch.device("cpu")),
        "rounds": rounds,
        "summary": summary,
        "http_over_direct": summarize(ratio),
        "http_cost_share": summarize([1 - x for x in ratio]),
        "http_cpu_us_per_token": summarize(extra),
        # the server process's CPU per token over the engine's own, as a share of the latter
        "http_cpu_share": summarize(
            [
                h["cpu_s"] / h["tokens"] / (d["cpu_s"] / d["tokens"]) - 1
                for h, d in zip(rounds["http"], rounds["direct"])
            ]
        ),
        # the server's event-loop thread alone (ticks of 1/CLK_TCK s: coarse at short rounds)
        "loop_cpu_us_per_token": summarize(
            [1e6 * h["loop_cpu_s"] / h["tokens"] for h in rounds["http"]]
        ),
        "client_cpu_us_per_token": summarize(
            [1e6 * h["client_cpu_s"] / h["tokens"] for h in rounds["http"]]
        ),
        **thread_split(rounds),
    }


def thread_split(rounds: dict) -> dict:
    """The CPU per token split at the device worker, both ways: its own (the forward pass:
    the same steps both ways, so what it spends more through the server is it running slower
    beside the server's other threads and the clients on the same cores) and the rest (the
    host's: in the server also the HTTP layer and the hand-over to it). Empty when a side
    has no device worker (``--no-overlap``)."""
    if any(x["device_cpu_s"] is None for rs in rounds.values() for x in rs):
        return {}
    # per way, per round: (the whole process, its device worker) CPU µs per token
    cpu = {
        way: [(1e6 * x["cpu_s"] / x["tokens"], 1e6 * x["device_cpu_s"] / x["tokens"]) for x in rs]
        for way, rs in rounds.items()
    }
    pairs = list(zip(cpu["http"], cpu["direct"]))
    return {
        "device_cpu_us_per_token": {w: summarize([d for _, d in v]) for w, v in cpu.items()},
        "host_cpu_us_per_token": {w: summarize([c - d for c, d in v]) for w, v in cpu.items()},
        # the rest's difference as a share of the engine's whole CPU per token: the HTTP
        # layer's own work, comparable to http_cpu_share
        "http_host_cpu_share": summarize(
            [(hc - hd - (dc - dd)) / dc for (hc, hd), (dc, dd) in pairs]
        ),
        # the device worker's CPU per token through the server over the direct engine's
        "device_cpu_share": summarize([hd / dd - 1 for (_, hd), (_, dd) in pairs]),
    }


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        got = Path(args.replot)
        print(
            f"wrote {plot(json.loads((got / 'httpcost.json').read_text()), got / 'httpcost.png')}"
        )
        return 0
    res = run(args)
    res["command"] = shlex.join(["engram-bench", "--http-cost", *argv])
    out = Path(args.out or f"bench/results/{dt.date.today().isoformat()}-cpu-http")
    out.mkdir(parents=True, exist_ok=True)
    (out / "httpcost.json").write_text(json.dumps(res, indent=1) + "\n")
    if not args.no_plots:
        plot(res, out / "httpcost.png")
    s = res["summary"]
    for way in ("direct", "http"):
        t, c = s[way]["tok_s"], s[way]["cpu_us_per_token"]
        print(
            f"{way:<7} {t['median']:8.0f} tok/s ({t['min']:.0f}-{t['max']:.0f})   "
            f"{c['median']:7.0f} CPU µs/token"
        )
    share = res["http_cost_share"]
    print(
        f"HTTP layer costs {share['median']:.0%} of the engine's direct throughput "
        f"({share['min']:.0%}..{share['max']:.0%}), "
        f"{res['http_cpu_us_per_token']['median']:.0f} CPU µs per token more"
    )
    cs, cl = res["http_cpu_share"], res["client_cpu_us_per_token"]
    print(
        f"server CPU per token {cs['median']:+.0%} over the engine's own "
        f"({cs['min']:+.0%}..{cs['max']:+.0%}); clients (one asyncio loop, counted apart) "
        f"{cl['median']:.0f} CPU µs per token"
    )
    lp = res["loop_cpu_us_per_token"]
    stack = res["http_stack"]
    print(
        f"server event loop {lp['median']:.0f} CPU µs per token ({lp['min']:.0f}-{lp['max']:.0f}) "
        f"on {stack['loop']} + {stack['http']}"
    )
    if "http_host_cpu_share" in res:
        dv, hs, ds = (
            res["device_cpu_us_per_token"],
            res["http_host_cpu_share"],
            res["device_cpu_share"],
        )
        print(
            f"device worker (the forward pass) {dv['direct']['median']:.0f} CPU µs per token "
            f"direct, {dv['http']['median']:.0f} through the server "
            f"({ds['median']:+.0%}, {ds['min']:+.0%}..{ds['max']:+.0%}); the rest of the "
            f"server over the rest of the engine {hs['median']:+.0%} of the engine's CPU per "
            f"token ({hs['min']:+.0%}..{hs['max']:+.0%})"
        )
    print(f"\nwrote {out / 'httpcost.json'}")
    return 0
