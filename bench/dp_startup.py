"""Start-up and recovery of ``engram-serve --data-parallel-size N`` (tables shared on the node).

    python -m bench.dp_startup [--table-mib 256] [--size 2] [--rounds 3] [--out DIR]

Builds a checkpoint with Engram tables of about ``--table-mib`` MiB (random weights, the
built-in tokenizer), then measures with the real command: one private-table server (the
baseline: its start-up and proportional set size), N engines on a fresh shared directory (the
first engine's table load, the others' attach), and ``--rounds`` times kill -9 of one engine:
seconds until it serves again and its attach time. Memory is PSS (shared pages split between
the processes that map them), so N engines over one shared table count it once.
Writes ``startup.json`` under ``bench/results/<date>-cpu-data-parallel/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import torch

from models.checkpoint import default_model_dir, load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.llama import EngramForCausalLM
from offload.shared_tables import mapping_pss

RESULTS = Path(__file__).resolve().parent / "results"


def make_checkpoint(out: Path, table_mib: int) -> int:
    """A checkpoint like the built-in one with tables of about ``table_mib`` MiB; their bytes."""
    base = ModelConfig.load(default_model_dir())
    layers, orders = len(base.engram_layer_ids), base.engram_max_ngram_size - 1
    width = 256
    rows_per_head = table_mib * 2**20 // (2 * width * layers * orders * base.engram_n_heads)
    fields = {**base.__dict__, "engram_head_dim": width}
    fields["engram_vocab_size"] = [rows_per_head] * orders
    cfg = ModelConfig(**fields).validate()
    torch.manual_seed(0)
    model = EngramForCausalLM(cfg).eval()
    _, tok = load_checkpoint(default_model_dir(), load_tables=False)
    save_checkpoint(model, out, tok)
    return sum(model.engram_table(lid).numel() * 2 for lid in cfg.engram_layer_ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return 0, {}


def complete(url: str) -> int:
    body = json.dumps({"prompt": "def main(", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status


def pss(pid: int) -> int:
    """Proportional set size of a process, bytes (smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("engram-serve")
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(exe), "--port", str(self.port), *args], stdout=out, stderr=subprocess.STDOUT
            )
        self.t0 = time.perf_counter()

    def wait(self, timeout: float = 600) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if get(self.url + "/health")[0] == 200:
                return time.perf_counter() - self.t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"engram-serve exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("engram-serve did not become healthy")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run(table_mib: int, size: int, rounds: int, work: Path) -> dict:
    ckpt = work / "ckpt"
    table_bytes = make_checkpoint(ckpt, table_mib)
    base = Server("--model", str(ckpt), log=work / "single.log")
    single_ready = base.wait()
    complete(base.url)
    log = (work / "single.log").read_text()
    found = re.search(r"tables \(read \+ place in \w+\) ([\d.]+)s", log)
    single = {
        "table_load_s": float(found.group(1)) if found else None,
        "ready_s": single_ready,
        "pss_bytes": pss(base.proc.pid),
        "rss_bytes": rss(base.proc.pid),
    }
    base.stop()

    shm = Path(tempfile.mkdtemp(prefix="engram-bench-", dir="/dev/shm"))
    args = [
        "--model",
        str(ckpt),
        "--data-parallel-size",
        str(size),
        "--shared-tables-dir",
        str(shm),
    ]
    dp = Server(*args, log=work / "dp.log")
    try:
        dp_ready = dp.wait()
        for _ in range(2 * size):
            complete(dp.url)
        engines = get(dp.url + "/health")[1]["engines"]
        # engines starting together load each table once between them (a lock per table),
        # the first to take a table's lock loading it, the others waiting and attaching
        first = [{k: e[k] for k in ("table_bytes_loaded", "table_load_s")} for e in engines]
        if sum(e["table_bytes_loaded"] for e in engines) != table_bytes:
            raise RuntimeError(f"the tables were not loaded exactly once: {first}")
        pids = [dp.proc.pid] + [e["pid"] for e in engines]
        memory = {
            "front_pss_bytes": pss(dp.proc.pid),
            "engines_pss_bytes": [pss(e["pid"]) for e in engines],
            "total_pss_bytes": sum(pss(p) for p in pids),
            "total_rss_bytes": sum(rss(p) for p in pids),
            # the shared table files' pages, summed over every engine that maps them: 1x the
            # tables (N private copies would be N x)
            "tables_pss_bytes": sum(
                mapping_pss(e["pid"], f) for e in engines for f in shm.rglob("*.rows")
            ),
        }
        recoveries, attaches = [], []
        for _ in range(rounds):
            victim = engines[-1]
            t0 = time.perf_counter()
            os.kill(victim["pid"], signal.SIGKILL)
            while True:
                now = get(dp.url + "/health")[1].get("engines", [])
                e = now[-1] if now else {}
                if e.get("status") == "ok" and e.get("pid") != victim["pid"]:
                    break
                time.sleep(0.05)
            recoveries.append(time.perf_counter() - t0)
            attaches.append(e["table_load_s"])
            assert e["table_bytes_loaded"] == 0, "the restarted engine reloaded the tables"
            for _ in range(2 * size):
                complete(dp.url)
            engines = now
    finally:
        dp.stop()
        shutil.rmtree(shm, ignore_errors=True)
    return {
        "what": "engram-serve --data-parallel-size: start-up, recovery, memory (tables shared)",
        "command": (
            f"python -m bench.dp_startup --table-mib {table_mib} --size {size} --rounds {rounds}"
        ),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
        },
        "table_bytes": table_bytes,
        "single_process": single,
        "data_parallel": {
            "size": size,
            "ready_s": dp_ready,
            "first_start_engines": first,
            "first_start_tables_in_s": max(e["table_load_s"] for e in first),
            "attach_s": spread(attaches),
            "killed_engine_serving_again_s": spread(recoveries),
            **memory,
            "pss_vs_single": memory["total_pss_bytes"] / single["pss_bytes"],
            "pss_vs_n_private_copies": memory["total_pss_bytes"] / (size * single["pss_bytes"]),
            "tables_pss_vs_table_bytes": memory["tables_pss_bytes"] / table_bytes,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.dp_startup", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--table-mib", type=int, default=256)
    ap.add_argument("--size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="engram-dp-bench-"))
    try:
        result = run(a.table_mib, a.size, a.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = a.out or RESULTS / f"{date.today().isoformat()}-cpu-data-parallel"
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
