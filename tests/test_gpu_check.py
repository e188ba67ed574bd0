"""bench/gpu-check: its --cpu dry run runs every stage through the same code (the real command,
in its own process), and the parts a GPU run leans on when something goes wrong."""

import json
import subprocess
import sys
import time

from bench import gpu_check
from bench.gpu_check import Outcome, Stage, exit_code, read_tests, run_stage
from bench.gpu_stages import warm_up

from .conftest import ROOT, tiny_model


def test_cpu_dry_run_runs_every_stage_and_writes_json_png_and_summary(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu-check"), "--cpu", "--out", str(out)],
        cwd=tmp_path,  # from anywhere: the script finds its checkout
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "gpu-check.json").read_text())
    stages = {s["name"]: s for s in res["stages"]}
    assert list(stages) == ["environment", "startup", "tests", "bench-builtin", "bench-4b"]
    assert all(s["status"] == "passed" for s in stages.values()), stages
    assert res["exit_code"] == 0 and res["provenance"]["commit"]
    assert res["provenance"]["command"] == f"bench/gpu-check --cpu --out {out}"
    assert res["environment"]["torch"] and "triton" in res["environment"]
    startup = json.loads((out / "startup.json").read_text())
    assert [run["row_format"] for run in startup["runs"]] == ["auto", "fp8"]
    kernels = [c["kernel"] for c in startup["runs"][1]["checks"]]
    assert kernels[:2] == ["attention decode", "attention prefill"]  # the interpreter's kernels
    assert "fp8 rows" in kernels[2]
    for name in ("builtin", "dense-4b-like"):
        bench = json.loads((out / name / "bench.json").read_text())
        assert bench["rows_identical"] and bench["tokens_identical"]
        assert (out / name / "penalty_vs_batch.png").is_file()
    assert "gbps" in json.dumps(json.loads((out / "builtin" / "bench.json").read_text())["micro"])
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# bench/gpu-check: PASSED (cpu dry run)")
    for part in ("## Start-up kernel check", "## Gather microbenchmark", "Decode sweep"):
        assert part in summary
    assert len(summary.splitlines()) < 120  # one page
    for s in stages.values():
        assert (out / s["log"]).is_file()


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
    _junit(tmp_path, '<testcase classname="t" name="s"><skipped/></testcase>')
    assert read_tests(cpu=False)(tmp_path, 0)[0] == "not run"  # a GPU machine skipping all


def test_a_stage_that_cannot_run_or_overruns_is_reported_and_the_next_still_runs(tmp_path):
    (tmp_path / "logs").mkdir()
    have = {"pytest": False, "torch": True}
    never = lambda out, rc: ("passed", "", {})  # noqa: E731
    o = run_stage(Stage("tests", "t", ["true"], never, needs=("pytest",)), tmp_path, 1e9, have)
    assert o.status == "not run" and "needs pytest" in o.detail and "PYTHONPATH=DIR" in o.detail
    sleeper = [sys.executable, "-c", "print('loading', flush=True); import time; time.sleep(60)"]
    slow = Stage("bench-4b", "slow", sleeper, never, needs=("torch",), min_s=0.5)
    t = time.monotonic()
    o = run_stage(slow, tmp_path, time.monotonic() + 2, have)
    assert o.status == "timed out" and time.monotonic() - t < 10 and "last: loading" in o.detail
    o = run_stage(slow, tmp_path, time.monotonic() + 0.1, have)
    assert o.status == "not run" and o.detail.startswith("out of time")
    exits = [sys.executable, "-c", "raise SystemExit(3)"]
    crash = Stage("startup", "c", exits, gpu_check.read_startup, needs=("torch",), min_s=0.5)
    o = run_stage(crash, tmp_path, time.monotonic() + 30, have)
    assert o.status == "failed" and "exit status 3, no result" in o.detail
    outcome = lambda s: Outcome("x", "x", s)  # noqa: E731
    assert exit_code([outcome("passed"), outcome("passed")]) == 0
    assert exit_code([outcome("passed"), outcome("not run")]) == 2
    assert exit_code([outcome("not run"), outcome("timed out")]) == 1


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
