"""bench/gpu-check: its --cpu dry run runs every stage through the same code (the real command,
in its own process), and the parts a GPU run leans on when something goes wrong."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict

import pytest

from bench import gpu_check
from bench.commit import git_commit, stamp
from bench.gpu_read import read_startup, read_tests
from bench.gpu_run import Outcome, Stage, caps, exit_code, run_stage, share
from bench.gpu_stages import warm_up

from .conftest import ROOT, tiny_model

CHECK = [sys.executable, str(ROOT / "bench" / "gpu-check")]


def _archive(out) -> dict[str, bytes]:
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        return {
            m.name.removeprefix("gpu-check/"): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile()
        }


def test_cpu_dry_run_runs_every_stage_into_three_files(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run(
        [*CHECK, "--cpu", "--out", str(out)],
        cwd=tmp_path,  # from anywhere: the script finds its checkout
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # the GPU machine sends back only a few files: everything else is in the archive
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.FILES)
    res = json.loads((out / "gpu-check.json").read_text())
    stages = {s["name"]: s for s in res["stages"]}
    assert list(stages) == [
        "environment", "startup", "tests", "bench-builtin", "host-cost", "bench-4b"
    ]  # fmt: skip
    assert all(s["status"] == "passed" for s in stages.values()), stages
    assert res["exit_code"] == 0 and res["provenance"]["commit"] == git_commit()["commit"]
    assert res["provenance"]["command"] == f"bench/gpu-check --cpu --out {out}"
    assert res["environment"]["torch"] and "triton" in res["environment"]
    assert sum(res["caps_s"].values()) <= res["deadline_s"]
    assert all(s["seconds"] <= s["budget_s"] for s in stages.values())
    files = _archive(out)
    startup = json.loads(files["startup.json"])
    assert [run["row_format"] for run in startup["runs"]] == ["auto", "fp8"]
    run = startup["runs"][1]
    kernels = [c["kernel"] for c in run["checks"]]
    assert kernels[:2] == ["attention decode", "attention prefill"]  # the interpreter's kernels
    assert "fp8 rows" in kernels[2] and run["fault"] is None
    assert run["memory"]["placement"] == "cpu" and "crossover_rows" in run and "grid" in run
    tests = stages["tests"]["data"]
    assert tests["counts"]["passed"] >= 4 and tests["gpu_marked"]["skipped"] >= 1
    for name in ("builtin", "dense-4b-like"):
        bench = json.loads(files[f"{name}/bench.json"])
        assert bench["rows_identical"] and bench["tokens_identical"]
        assert f"{name}/penalty_vs_batch.png" in files
    host = json.loads(files["host-cost/hostcost.json"])
    assert {(x["mode"], x["batch"]) for x in host["results"]} == {("overlap", 1), ("no-overlap", 1)}
    assert stages["host-cost"]["detail"].startswith("overlapped B=1 ctx=32: host ")
    micro = json.loads(files["builtin/bench.json"])["micro"]
    assert {r["values"] for r in micro["rows"]} == {64} and "gbps" in json.dumps(micro)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# bench/gpu-check: PASSED (cpu dry run)")
    for part in ("## Start-up kernel check", "## Gather microbenchmark", "Decode sweep"):
        assert part in summary
    assert len(summary.splitlines()) < 120  # one page
    for s in stages.values():
        log = files[s["log"]].decode()
        assert log.startswith("[") and "start " in log and "exit status 0" in log
    assert "loading the built-in model" in files["logs/startup.log"].decode()


def test_a_killed_run_leaves_the_stages_it_finished_and_the_running_ones_log(tmp_path):
    out = tmp_path / "check"
    argv = [*CHECK, "--cpu", "--out", str(out), "--stages", "startup,bench-4b"]
    proc = subprocess.Popen(
        [*argv, "--pack-every", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        t = time.monotonic()
        while time.monotonic() - t < 120:  # until the start-up check has printed a phase
            time.sleep(0.5)
            try:
                log = _archive(out).get("logs/startup.log", b"").decode()
            except (OSError, tarfile.TarError, EOFError):
                continue
            if "warming up" in log:
                break
        else:
            pytest.fail("the running stage's log never reached the archive")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what the machine's limit does
        proc.wait(timeout=30)
    assert len(list(out.iterdir())) <= 4  # the three, and at most one half-written
    res = json.loads((out / "gpu-check.json").read_text())
    assert res["status"] == "running" and res["stages_selected"] == [
        "environment", "startup", "bench-4b"
    ]  # fmt: skip
    assert [(s["name"], s["status"]) for s in res["stages"]] == [
        ("environment", "passed"), ("startup", "pending"), ("bench-4b", "pending")
    ]  # fmt: skip
    assert "RUNNING (written after stage 1 of 3" in (out / "summary.md").read_text()
    assert "rows: loading the built-in model" in log  # flushed by the child as it went


def test_stages_share_the_deadline_by_weight_and_fit_it():
    stages = gpu_check.plan(ROOT, cpu=False, plots=False, engram_params=None)
    total = gpu_check.DEADLINE_S - gpu_check.RESERVE_S
    cap = caps(stages, total)
    assert sum(cap.values()) == pytest.approx(total) and gpu_check.DEADLINE_S <= 480
    assert min(cap, key=cap.get) == "environment" and max(cap, key=cap.get) == "bench-4b"
    first, *rest = stages
    deadline = time.monotonic() + total
    assert share(first, rest, deadline) == pytest.approx(cap["environment"], abs=0.1)
    last = stages[-1]
    assert share(last, [], deadline) == pytest.approx(total, abs=0.1)  # the rest is its own
    dense = stages[-1].argv
    assert dense[dense.index("--engram-params") + 1] == "2e9"
    named = {s.name: s.argv for s in stages}
    builtin = named["bench-builtin"]
    assert builtin[builtin.index("--micro-values") + 1] == "128"
    host = named["host-cost"]
    assert host[host.index("--device") + 1] == "cuda" and "--stand-in" not in host


def test_stages_picks_a_subset_and_refuses_unknown_names(tmp_path):
    assert gpu_check._args(["--stages", "tests"]).stages == ["environment", "tests"]
    assert gpu_check._args(["--deadline", "100"]).deadline == 100.0
    assert gpu_check._args(["--deadline-s", "90"]).deadline == 90.0
    r = subprocess.run([*CHECK, "--stages", "tests,nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown nope" in r.stderr


def _junit(tmp_path, cases: str):
    (tmp_path / "gpu-tests.xml").write_text(
        f"<testsuites><testsuite>{cases}</testsuite></testsuites>"
    )


def test_tests_missing_packages_are_not_failures_but_project_import_errors_are(tmp_path):
    missing = "E   ModuleNotFoundError: No module named 'fastapi'"
    _junit(
        tmp_path,
        '<testcase classname="tests.t" name="a"/><testcase classname="tests.t" name="s">'
        '<skipped message="x"/></testcase>'
        f'<testcase classname="" name="tests.test_web"><error message="collection failure">'
        f"{missing}</error></testcase>",
    )
    status, line, data = read_tests(cpu=False)(tmp_path, 0)
    assert status == "passed" and data["not_collected_for"] == ["fastapi"]
    assert "1 passed, 1 skipped, 1 not collected" in line
    broken = missing.replace("fastapi", "engine.gone")
    _junit(tmp_path, f'<testcase classname="" name="tests.x"><error>{broken}</error></testcase>')
    assert read_tests(cpu=False)(tmp_path, 1)[0] == "failed"


GPU = '<properties><property name="marker" value="gpu"/></properties>'


def test_skips_are_not_passes_and_a_gpu_run_whose_gpu_tests_all_skip_is_flagged(tmp_path):
    skip = '<skipped message="needs CUDA and CuPy"/>'
    _junit(tmp_path, f'<testcase classname="t" name="s">{skip}</testcase>')
    status, line, data = read_tests(cpu=False)(tmp_path, 0)
    assert status == "not run" and "no test ran" in line and "1x needs CUDA and CuPy" in line
    assert data["counts"]["passed"] == 0 and data["counts"]["skipped"] == 1
    # the kernel files pass, but every gpu-marked test skipped: the GPU paths were not tested
    cases = '<testcase classname="t" name="k"/>' + "".join(
        f'<testcase classname="t" name="g{i}">{GPU}{skip}</testcase>' for i in range(3)
    )
    _junit(tmp_path, cases)
    status, line, data = read_tests(cpu=False)(tmp_path, 0)
    assert status == "not run" and "every gpu-marked test (3) skipped" in line
    assert data["gpu_marked"] == {"passed": 0, "skipped": 3, "other": 0}
    assert read_tests(cpu=True)(tmp_path, 0)[0] == "passed"  # the dry run: expected there
    _junit(tmp_path, cases + f'<testcase classname="t" name="g">{GPU}</testcase>')
    status, line, _ = read_tests(cpu=False)(tmp_path, 0)
    assert status == "passed" and "2 passed, 3 skipped" in line


def test_the_test_stage_runs_the_cuda_kernel_files_whole_and_the_gpu_tests_first():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "bench.gpu_select",
         "tests/test_hostmem.py", "tests/test_uva_kernel.py", "tests/test_grid.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    ids = [x for x in r.stdout.splitlines() if "::" in x]
    whole = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "tests/test_uva_kernel.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    uva = [x for x in whole.splitlines() if "::" in x]
    marked = [x for x in ids if not x.startswith("tests/test_uva_kernel.py")]
    assert marked and all("gpu" in x for x in marked)  # test_hostmem's gpu tests, no test_grid
    assert ids[: len(marked)] == marked and sorted(ids[len(marked) :]) == sorted(
        x for x in uva if x not in marked
    )  # fmt: skip


def test_a_stage_that_cannot_run_or_overruns_is_reported_and_the_next_still_runs(tmp_path):
    have = {"pytest": False, "torch": True}
    never = lambda out, rc: ("passed", "", {})  # noqa: E731
    o = run_stage(Stage("tests", "t", ["true"], never, needs=("pytest",)), tmp_path, 1e9, have)
    assert o.status == "not run" and "needs pytest" in o.detail and "PYTHONPATH=DIR" in o.detail
    sleeper = [sys.executable, "-c", "print('loading'); import time; time.sleep(60)"]
    slow = Stage("bench-4b", "slow", sleeper, never, needs=("torch",), min_s=0.5)
    t, ticks = time.monotonic(), []
    o = run_stage(slow, tmp_path, 2, have, tick=lambda: ticks.append(1), tick_s=0.5)
    assert o.status == "timed out" and time.monotonic() - t < 10 and ticks
    assert "last: loading" in o.detail  # printed unflushed: the child runs unbuffered
    assert "killed after" in (tmp_path / o.log).read_text()
    o = run_stage(slow, tmp_path, 0.1, have)
    assert o.status == "not run" and o.detail.startswith("out of time")
    exits = [sys.executable, "-c", "import sys; print('boom: no table', file=sys.stderr); "
             "raise SystemExit(3)"]  # fmt: skip
    crash = Stage("startup", "c", exits, read_startup, needs=("torch",), min_s=0.5)
    o = run_stage(crash, tmp_path, 30, have)
    assert o.status == "failed" and "exit status 3, no result" in o.detail
    assert o.stderr_tail == "boom: no table"  # the reason, for the summary
    outcome = lambda s: Outcome("x", "x", s)  # noqa: E731
    assert exit_code([outcome("passed"), outcome("passed")]) == 0
    assert exit_code([outcome("passed"), outcome("not run")]) == 2
    assert exit_code([outcome("not run"), outcome("timed out")]) == 1


def test_the_summary_shows_why_a_stage_failed_and_an_engine_fault(tmp_path):
    from bench.gpu_summary import render

    run = {"row_format": "auto", "dtype": "bf16", "gather": "auto", "placement": "host",
           "load_s": 1.0, "warm_up_s": 2.0, "check_s": 0.1, "checks": [],
           "memory": {"memory": ["thp"], "registered": True}, "crossover_rows": 4096,
           "grid": {"programs": 33, "sms": 132, "why": "fastest"},
           "fault": "RuntimeError: CUDA error", "ok": False}  # fmt: skip
    (tmp_path / "startup.json").write_text(json.dumps({"runs": [run], "ok": False}))
    status, line, data = read_startup(tmp_path, 1)
    assert status == "failed" and "ENGINE FAULT: RuntimeError: CUDA error" in line
    bench = Outcome("bench-4b", "bench", "failed", 3.0, "exit status 1, no result",
                    stderr_tail="Traceback\nRuntimeError: CUDA out of memory")  # fmt: skip
    started = Outcome("startup", "start-up", status, 5.0, line, data=data)
    result = {"status": "failed", "exit_code": 1, "profile": "gpu", "seconds": 9.0,
              "deadline_s": 450, "environment": {}, "stages": [asdict(started), asdict(bench)],
              "provenance": {"commit": "abc", "commit_from": "COMMIT", "command": "c",
                             "date": "d"}}  # fmt: skip
    page = render(result, tmp_path)
    assert "stderr of bench-4b" in page and "RuntimeError: CUDA out of memory" in page
    assert "ENGINE FAULT" in page and "staged from 4096 rows" in page and "33 programs" in page
    assert "commit abc (from COMMIT)" in page


def test_the_commit_outside_git_comes_from_the_variable_or_the_file(tmp_path):
    assert git_commit(tmp_path, {})["commit"] == "unknown"
    got = git_commit(tmp_path, {"ENGRAM_COMMIT": "abc123"})
    assert got == {"commit": "abc123", "dirty": None, "commit_from": "$ENGRAM_COMMIT"}
    (tmp_path / "COMMIT").write_text("def456 dirty\n")
    assert git_commit(tmp_path, {})["commit"] == "def456" and git_commit(tmp_path, {})["dirty"]
    assert git_commit(ROOT, {"ENGRAM_COMMIT": "x"})["commit_from"] == "git"
    with pytest.raises(RuntimeError, match="not a git checkout"):
        stamp(tmp_path)


def test_a_warm_up_whose_step_faults_is_reported_not_passed():
    from engine.config import EngineConfig
    from engine.engine import Engine
    from offload.offloaded_model import OffloadedModel

    model = tiny_model()
    om = OffloadedModel.from_model(model, "cpu", "worker")
    engine = Engine(model, EngineConfig(), rows=om.prefetcher)
    assert warm_up(engine)[1] is None
    real = om.prefetcher.gather_layer

    def failing(lp):
        raise RuntimeError("injected fault")

    om.prefetcher.gather_layer = failing  # the engine catches the step's fault and goes on
    seconds, fault = warm_up(engine)
    assert seconds > 0 and "injected fault" in fault
    om.prefetcher.gather_layer = real
    om.close()
