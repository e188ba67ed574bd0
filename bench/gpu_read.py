"""What each stage of ``bench/gpu-check`` left, read back into (status, one line, data).

Standard library only. Test counts keep skips apart from passes: a stage whose tests all
skipped (or whose gpu-marked tests all skipped) did not test the GPU, and says why.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

PROJECT = ("engine", "models", "offload", "bench", "server", "training", "tests")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_environment(out: Path, rc: int) -> tuple[str, str, dict]:
    env = _json(out / "environment.json")
    if rc != 0:
        return "failed", env.get("error", f"exit status {rc}"), env
    line = f"{env['device']}, torch {env['torch']}, triton {env.get('triton')}"
    return "passed", line, env


def read_startup(out: Path, rc: int) -> tuple[str, str, dict]:
    res = _json(out / "startup.json")
    parts = []
    for r in res["runs"]:
        if "error" in r:
            parts.append(f"{r['row_format']} rows: {r['error']}")
            continue
        bad = [c["kernel"] for c in r["checks"] if not c["ok"]]
        held = f"{len(r['checks']) - len(bad)}/{len(r['checks'])} held"
        parts.append(
            f"{r['row_format']} rows ({r['dtype']}, {r['gather']}): {held}"
            + (f", FAILED: {'; '.join(bad)}" if bad else "")
            + (f", ENGINE FAULT: {r['fault']}" if r.get("fault") else "")
            + f", check {r['check_s']:.2f} s"
        )
    return ("passed" if res["ok"] and rc == 0 else "failed"), "; ".join(parts), res


def read_tests(cpu: bool):
    """The tests stage's reader; on a CPU (the dry run) gpu-marked tests are expected to skip."""
    return lambda out, rc: _read_tests(out, rc, cpu)


def _read_tests(out: Path, rc: int, cpu: bool) -> tuple[str, str, dict]:
    xml = out / "gpu-tests.xml"
    if not xml.is_file():  # e.g. a crash inside CUDA took pytest down
        why = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        so_far = tests_so_far(out / "logs" / "tests.log")
        return "failed", f"pytest ended ({why}) without a report: {so_far}", {}
    root = ET.parse(xml).getroot()
    counts = dict.fromkeys(("passed", "failed", "error", "skipped", "not collected"), 0)
    gpu = dict.fromkeys(("passed", "skipped", "other"), 0)  # the gpu-marked tests alone
    failed, missing, reasons = [], set(), Counter()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        marked = any(p.get("name") == "marker" and p.get("value") == "gpu"
                     for p in case.iter("property"))  # fmt: skip
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            text = (bad.get("message") or "") + (bad.text or "")
            needs = re.findall(r"No module named '([\w.]+)'", text)
            if needs and needs[0].split(".")[0] not in PROJECT:  # a package this machine lacks
                counts["not collected"] += 1
                missing.add(needs[0].split(".")[0])
                continue
            counts["failed" if bad.tag == "failure" else "error"] += 1
            failed.append(name)
            kind = "other"
        elif skip is not None:
            counts["skipped"] += 1
            reasons[(skip.get("message") or "no reason given").strip()[:100]] += 1
            kind = "skipped"
        else:
            counts["passed"] += 1
            kind = "passed"
        if marked:
            gpu[kind] += 1
    line = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
    if missing:
        line += f" (files that import {', '.join(sorted(missing))}, absent here)"
    data = {
        "counts": counts,
        "gpu_marked": gpu,
        "failed": failed,
        "not_collected_for": sorted(missing),
        "skip_reasons": dict(reasons.most_common(5)),
    }
    status = "passed"
    if counts["failed"] + counts["error"]:
        status = "failed"
        line += f"; failed: {', '.join(failed[:5])}"
    elif not counts["passed"]:
        status, line = "not run", f"{line}: no test ran"
    elif sum(gpu.values()) and not gpu["passed"] and not cpu:
        status, line = "not run", f"{line}: every gpu-marked test ({gpu['skipped']}) skipped"
    if reasons:
        line += " (skipped: " + "; ".join(f"{n}x {r}" for r, n in reasons.most_common(2)) + ")"
    return status, line, data


def tests_so_far(log: Path) -> str:
    """Outcomes pytest -v printed before it was stopped."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    got = {k: len(re.findall(rf"::\S+ {k.upper()}", text)) for k in ("passed", "failed", "skipped")}
    failed = re.findall(r"^(\S+::\S+) FAILED", text, re.M)
    line = ", ".join(f"{v} {k}" for k, v in got.items()) + " before it stopped"
    return line + (f"; failed: {', '.join(failed[:5])}" if failed else "")


def read_bench(name: str):
    def read(out: Path, rc: int) -> tuple[str, str, dict]:
        res = _json(out / name / "bench.json")
        rows = res["rows"]
        base = rows[0]["name"]
        parts = [] if rc == 0 else [f"exit status {rc}"]
        parts += [
            "rows identical" if res["rows_identical"] else "ROWS DIFFER",
            "tokens identical" if res["tokens_identical"] else "TOKENS DIFFER",
        ]
        for r in rows[1:]:
            p = r["paper"]["penalty"]["decode"]
            if p["pct"] is not None:
                parts.append(f"{r['name']} decode {p['pct']:+.1f}% vs {base} ({p['verdict']})")
        status = "passed" if rc == 0 and not res["failures"] else "failed"
        return status, "; ".join(parts + res["failures"][:3]), {"bench": f"{name}/bench.json"}

    return read


def read_host_cost(out: Path, rc: int) -> tuple[str, str, dict]:
    """Overlapped host µs per decode step and the device's idle share at each point."""
    res = _json(out / "host-cost" / "hostcost.json")
    parts = [] if rc == 0 else [f"exit status {rc}"]
    for x in res["results"]:
        if x["mode"] == "overlap":
            parts.append(
                f"B={x['batch']} ctx={x['context']}: host {x['host_us']['median']:.0f} µs, "
                f"device idle {x['device_idle']['median']:.0%}"
            )
    status = "passed" if rc == 0 else "failed"
    return status, "overlapped " + "; ".join(parts), {"host_cost": "host-cost/hostcost.json"}
