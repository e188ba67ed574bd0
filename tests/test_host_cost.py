"""The host timer and ``engram-bench --host-cost``."""

import argparse
import json
import time

import pytest
import torch

from bench.cli import main as bench_main
from bench.hostcost import IdleDevice, device_from_series, markdown, stand_in, stand_ins_for
from engine.host_time import NO_TIMER, HostTimer
from models.checkpoint import load_checkpoint


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
    points = {(x["mode"], x["batch"], x["context"], x["stand_in"]) for x in res["results"]}
    grid = {(b, c) for b in (1, 4) for c in (16, 40)}
    modes, kinds = ("overlap", "no-overlap"), ("forward", "idle")
    assert points == {(m, b, c, k) for m in modes for b, c in grid for k in kinds}
    for x in res["results"]:
        assert len(x["host_us"]["raw"]) == 2 and x["host_us"]["median"] > 0
        # every round's: overlapped, the device's part is the worker's time on the job the
        # step read (busy time that ended inside the step was 0 when the job ended between
        # two steps, and the device idle share then 1)
        assert min(x["device_us"]["raw"]) > 0 and max(x["device_idle"]["raw"]) < 1
        assert min(x["device_idle"]["raw"]) >= 0
        # in series the forward pass runs in the host thread; overlapped, on the worker
        device = "device" if x["mode"] == "overlap" else "forward"
        assert {"schedule", "hash", "pack", "append", device} <= set(x["parts_us"])
        # overlapped steps are also measured without the per-part timer
        assert (x["mode"] == "overlap") == ("host_untimed_us" in x)
        if x["mode"] == "overlap":
            assert x["host_untimed_us"]["median"] > 0
        assert min(x["switches"]["raw"]) >= 0
        if x["mode"] == "overlap" and x["stand_in"] == "forward":
            # the host waits for the worker's forward pass: at least one switch a step
            assert x["switches"]["median"] >= 1
    assert set(res["load_average"]) == {"start", "end"}
    # the README's table from the result: one row per point, the figures the JSON holds
    assert bench_main(["--host-cost", "--markdown", str(out)]) == 0
    table = markdown([str(out)]).splitlines()
    assert len(table) == 2 + len(grid)
    assert "overlapped, idle device" in table[0]

    def got(k, mode="overlap"):
        key = (mode, 4, 40, k)
        return next(
            x for x in res["results"] if (x["mode"], x["batch"], x["context"], x["stand_in"]) == key
        )

    row = next(r for r in table if r.startswith("| 4 | 40 |")).split(" | ")
    # the forward stand-in's overlapped figure, then the idle one's (after in series)
    assert row[3].startswith(f"{got('forward')['host_us']['median']:,.0f} (")
    assert row[6].startswith(f"{got('idle')['host_us']['median']:,.0f} (")
    # the idle stand-in reads nothing of the model: its device part is a fraction (in series,
    # where it is the host thread's CPU time: a worker's wall time can take a preemption)
    idle, forward = got("idle", "no-overlap"), got("forward", "no-overlap")
    assert idle["device_us"]["median"] < forward["device_us"]["median"]


def test_idle_stand_in_gives_the_steps_logits_and_restores_the_model():
    model = load_checkpoint(load_tables=False)[0]
    idle = IdleDevice(rows=8, vocab=model.config.vocab_size, seed=0)
    with stand_in(model, idle):
        a = model.forward_step(None, None, torch.arange(5))
        b = model.forward_step(None, None, torch.arange(5))
    assert a.shape == (5, model.config.vocab_size) and not torch.equal(a, b)
    assert a.argmax(-1).unique().numel() > 1  # rows differ: the tokens vary
    assert "forward_step" not in vars(model)  # the model's own method again


def test_a_part_entered_again_inside_itself_is_charged_once():
    timer = HostTimer()
    with timer:
        timer.take()
        with timer("a"):
            _burn(0.01)
            with timer("a"):  # the same name nested: one part object, the stack keeps order
                _burn(0.01)
            with timer("b"):
                _burn(0.01)
        parts = timer.take()
    assert 0.015e9 < parts["a"] < 0.03e9 and 0.005e9 < parts["b"] < 0.02e9


def test_a_gpu_run_takes_the_devices_time_from_the_same_point_in_series():
    """On CUDA the worker's time is its launches: overlapped, the device's time per step is
    the in-series wall less host of the same point and round, the idle share from it."""
    series = [{"wall_us": 5000.0, "host_us": 1000.0}, {"wall_us": 5400.0, "host_us": 1200.0}]
    overlapped = [{"wall_us": 4000.0, "host_us": 900.0}, {"wall_us": 5000.0, "host_us": 950.0}]
    raw = {(8, 128, "no-overlap", "forward"): series, (8, 128, "overlap", "forward"): overlapped}
    point = {"mode": "overlap", "batch": 8, "context": 128, "stand_in": "forward"}
    results = [point, {**point, "mode": "no-overlap", "device_us": "kept"}]
    device_from_series(results, raw)
    assert point["device_us"]["raw"] == [4000.0, 4200.0]
    assert point["device_idle"]["raw"] == [0.0, pytest.approx(1 - 4200 / 5000)]
    assert results[1]["device_us"] == "kept"  # in series: as measured


def test_stand_ins_default_by_device_and_idle_is_cpu_only():
    args = argparse.Namespace(stand_in=None)
    assert stand_ins_for(args, torch.device("cpu")) == ["forward", "idle"]
    assert stand_ins_for(args, torch.device("cuda")) == ["forward"]
    with pytest.raises(SystemExit, match="use --stand-in forward"):
        stand_ins_for(argparse.Namespace(stand_in="idle"), torch.device("cuda"))
