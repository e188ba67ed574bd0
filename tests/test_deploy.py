"""Deployment files checked with real tools: promtool, a compose parser, a real Prometheus
scraping a real engram-serve, every dashboard and alert expression evaluated through its API."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import ROOT
from .live import free_port, serve

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "engram-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it with apt-get")
        pytest.skip(f"{name} not installed (apt-get install prometheus docker-compose)")
    return path


def test_promtool_accepts_config_and_rules():
    promtool = _tool("promtool")
    for args in (["check", "config"], ["check", "rules"]):
        target = DEPLOY / "prometheus" / ("prometheus.yml" if args[1] == "config" else "alerts.yml")
        r = subprocess.run([promtool, *args, str(target)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]]
)
def test_compose_parses_and_every_mount_exists(files):
    compose = _tool("docker-compose")
    args = [compose]
    for f in files:
        args += ["-f", str(ROOT / f)]
    r = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert {"engram-serve", "prometheus", "grafana"} <= set(cfg["services"])
    assert {"prometheus-data", "grafana-data"} <= set(cfg["volumes"])
    for svc in cfg["services"].values():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source not in cfg["volumes"]:  # a bind mount, not a named volume
                assert Path(source).exists(), f"mounted path {source} is missing"
    if "docker-compose.gpu.yml" in files:
        devices = cfg["services"]["engram-serve"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def test_dockerfile_uses_the_ci_install_steps():
    text = (ROOT / "Dockerfile").read_text()
    assert ".ci/install" in text and "HEALTHCHECK" in text and "/health" in text
    assert "USER engram" in text and "EXPOSE 8000" in text
    assert ".ci/install dev" in (ROOT / ".ci" / "run").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # a local venv (GBs) stays out of the image


def test_ci_runs_the_readme_set_up_and_test_command():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("## ", 1)[0]
    blocks = [b.split("```", 1)[0].strip() for b in setup.split("```bash\n")[1:]]
    install, test = blocks[:2]
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && .ci/install dev")
    assert install.endswith("&& engram-serve")
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert run[-1] == test == ". .venv/bin/activate && python3 -m pytest -q"
    assert "python3 -m venv .venv" in run and ". .venv/bin/activate" in run


def test_dockerfile_healthcheck_probes_the_configured_port(tiny_ckpt):
    text = (ROOT / "Dockerfile").read_text()
    probe = text.split("HEALTHCHECK", 1)[1].split("CMD python3 -c ", 1)[1].splitlines()[0]
    code = probe.strip()[1:-1]  # the shell-quoted Python one-liner
    with serve(tiny_ckpt) as srv:
        env = {**os.environ, "ENGRAM_PORT": srv.url.rsplit(":", 1)[1]}
        assert subprocess.run(["python3", "-c", code], env=env, timeout=30).returncode == 0
        env["ENGRAM_PORT"] = str(free_port())  # nothing listens there: unhealthy
        r = subprocess.run(["python3", "-c", code], env=env, capture_output=True, timeout=30)
        assert r.returncode != 0


# vLLM's published Grafana dashboard (examples/observability/prometheus_grafana/grafana.json in
# vllm-project/vllm): its panels' expressions, copied as they are; and the query the
# production-stack's KEDA autoscaling scales on.
VLLM_QUANTILES = [
    f'histogram_quantile({q}, sum by(le) (rate(vllm:{m}_bucket{{model_name="$model_name"}}'
    "[$__rate_interval])))"
    for m in ("e2e_request_latency_seconds", "inter_token_latency_seconds",
              "time_to_first_token_seconds")
    for q in ("0.99", "0.95", "0.9", "0.5")
]  # fmt: skip
VLLM_MEANS = [
    f'rate(vllm:{m}_sum{{model_name="$model_name"}}[$__rate_interval])\n/\n'
    f'rate(vllm:{m}_count{{model_name="$model_name"}}[$__rate_interval])'
    for m in ("e2e_request_latency_seconds", "inter_token_latency_seconds",
              "time_to_first_token_seconds")
]  # fmt: skip
VLLM_DASHBOARD = [
    *VLLM_QUANTILES,
    *VLLM_MEANS,
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'vllm:kv_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}'
    "[$__rate_interval]))",
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}'
    "[$__rate_interval]))",
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}'
    "[$__rate_interval]))",
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
    "vllm:num_requests_waiting",  # production-stack / KEDA ScaledObject trigger
]


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["templating"]["list"][0]["name"] == "model_name"
    out = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        out += [(panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def _alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def test_grafana_provisioning_points_at_the_dashboard():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/engram.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert len(_dashboard_exprs()) >= 15


def _query(prom: str, expr: str) -> dict:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    return r.json()


def test_real_prometheus_scrapes_and_every_expression_returns(tiny_ckpt, tmp_path):
    prometheus = _tool("prometheus")
    from models.checkpoint import ENGRAM_FILE, table_key
    from models.config import ModelConfig
    from offload.file_tier import table_bytes

    lids = ModelConfig.load(tiny_ckpt).engram_layer_ids
    tables = sum(table_bytes(tiny_ckpt / ENGRAM_FILE, {i: table_key(i) for i in lids}).values())
    # two servers behind one job, so every tier's panel has data: the file tier (a DRAM cache
    # as large as the tables) and host tables with an adaptive hot-row cache
    file_tier = {"placement": "file", "host_memory_bytes": tables}
    hot = {"hot_rows": "0.05", "hot_rows_policy": "adaptive", "hot_rows_refresh": 4}
    name = ["engram-test"]
    with (
        serve(tiny_ckpt, served_model_name=name, dedup=True, **file_tier) as srv,
        serve(tiny_ckpt, served_model_name=name, dedup=True, **hot) as srv_hot,
    ):
        port = free_port()
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ALERTS)]
        targets = [x.url.split("//")[1] for x in (srv, srv_hot)]
        config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
        cfg_path = tmp_path / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={cfg_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        prom = f"http://127.0.0.1:{port}"
        try:
            for i in range(6):  # traffic to both, spread over a few scrapes
                for url in (srv.url, srv_hot.url):
                    r = httpx.post(
                        url + "/v1/completions",
                        json={"prompt": f"def f{i}(x):", "max_tokens": 8, "n": 2},
                        timeout=30,
                    )
                    assert r.status_code == 200
                    httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": 9})
                time.sleep(0.4)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    res = _query(prom, "count_over_time(engram_generation_tokens_total[1m])")
                    if res["data"]["result"] and float(res["data"]["result"][0]["value"][1]) >= 4:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("Prometheus did not scrape the server")
            up = _query(prom, 'up{job="engram-serve"}')["data"]["result"]
            assert len(up) == 2 and all(u["value"][1] == "1" for u in up)
            ours = _dashboard_exprs()
            for title, expr in ours + [("vLLM dashboard", e) for e in VLLM_DASHBOARD]:
                q = expr.replace("$model_name", "engram-test").replace("$__rate_interval", "20s")
                res = _query(prom, q)
                assert res["status"] == "success", (title, q, res)
                assert res["data"]["result"], f"panel {title!r} returned no data: {q}"
            for name, expr in _alert_exprs():
                res = _query(prom, expr)
                assert res["status"] == "success", (name, res)
            rules = httpx.get(prom + "/api/v1/rules").json()["data"]["groups"][0]["rules"]
            assert len(rules) == 4 and all(r["health"] in ("ok", "unknown") for r in rules)
        finally:
            proc.terminate()
            proc.wait(10)
