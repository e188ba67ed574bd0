"""The host timer and ``engram-bench --host-cost``."""

import json
import time

from bench.cli import main as bench_main
from bench.hostcost import markdown
from engine.host_time import NO_TIMER, HostTimer


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_host_timer_charges_parts_exclusively():
    timer = HostTimer()
    with timer:
        timer.take()
        with timer("outer"):
            _burn(0.02)
            with timer("inner"):
                _burn(0.03)
        time.sleep(0.05)  # waiting is not CPU time
        parts = timer.take()
    assert 0.015e9 < parts["outer"] < 0.03e9  # the inner part's time is not in it
    assert 0.025e9 < parts["inner"] < 0.045e9
    assert parts.get("other", 0) < 0.01e9
    with NO_TIMER("anything"):  # off: a no-op
        pass


def test_host_cost_bench_writes_parts_per_point(tmp_path):
    out = tmp_path / "hc"
    argv = ["--host-cost", "--batch-sizes", "1,4", "--contexts", "16,40", "--steps", "2"]
    assert bench_main([*argv, "--repeats", "2", "--no-plots", "--out", str(out)]) == 0
    res = json.loads((out / "hostcost.json").read_text())
    assert res["command"].startswith("engram-bench --host-cost")
    points = {(x["mode"], x["batch"], x["context"]) for x in res["results"]}
    grid = {(b, c) for b in (1, 4) for c in (16, 40)}
    assert points == {(m, b, c) for m in ("overlap", "no-overlap") for b, c in grid}
    for x in res["results"]:
        assert len(x["host_us"]["raw"]) == 2 and x["host_us"]["median"] > 0
        assert x["device_us"]["median"] > 0 and 0 <= x["device_idle"]["median"] < 1
        # in series the forward pass runs in the host thread; overlapped, on the worker
        device = "device" if x["mode"] == "overlap" else "forward"
        assert {"schedule", "hash", "pack", "append", device} <= set(x["parts_us"])
        # overlapped steps are also measured without the per-part timer
        assert (x["mode"] == "overlap") == ("host_untimed_us" in x)
        if x["mode"] == "overlap":
            assert x["host_untimed_us"]["median"] > 0
    assert set(res["load_average"]) == {"start", "end"}
    # the README's table from the result: one row per point, the figures the JSON holds
    assert bench_main(["--host-cost", "--markdown", str(out)]) == 0
    table = markdown([str(out)]).splitlines()
    assert len(table) == 2 + len(grid)
    key = ("overlap", 4, 40)
    ov = next(x for x in res["results"] if (x["mode"], x["batch"], x["context"]) == key)
    row = next(r for r in table if r.startswith("| 4 | 40 |"))
    assert f"{ov['host_us']['median']:,.0f} (" in row
