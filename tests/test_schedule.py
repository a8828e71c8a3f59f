"""A real Prefect server on loopback, the scheduled-audit deployment registered by `robustdata serve`,
a run triggered through the REST API: it completes and writes its reports and artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from robustdata.flows.server import prefect_server, stop_process_group

BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited with {process.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def real_server(tmp_path):
    """`prefect server start` on a free loopback port with its own home; yields the API URL."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    with prefect_server(log=tmp_path / "server.log", env=env) as url:
        yield url


def tiny_params(root: Path) -> Path:
    """An audit small enough for a test: 6,000 MNIST images, 60 planted canaries, three epochs."""
    train = {"arch": "small_cnn", "epochs": 3, "batch_size": 64, "lr": 0.05, "seed": 0}
    params = {
        "ingest": {"source": "mnist", "out": "data/mnist", "limit": 6000},
        "poison": {"data": "data/mnist", "out": "data/poisoned", "count": 60, "rate": None, "target": 0},
        "train_suspect": {**train, "data": "data/poisoned", "out": "models/suspect"},
        "audit": {"model": "models/suspect", "data": "data/poisoned", "out": "data/filtered", "report": "reports/audit"},
        "results": {"out": "reports"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_served_deployment_runs_on_a_real_server(real_server, tmp_path, cache_dir):
    params = tiny_params(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": real_server, "PREFECT_HOME": str(tmp_path / "serve-home")}
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "robustdata", "serve", "--cron", "0 3 * * *", "--params",
                              str(params), "--name", "nightly"], env=env, stdout=log, stderr=subprocess.STDOUT,
                             cwd=tmp_path / "..", start_new_session=True)
    client = httpx.Client(base_url=real_server, timeout=30)
    try:
        def deployment():
            found = client.post("/deployments/filter", json={"deployments": {"name": {"any_": ["nightly"]}}}).json()
            return found[0] if found else None

        registered = wait_for(deployment, 180, "the deployment to be registered", serve)
        schedules = registered["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * *"] and schedules[0]["active"]

        def upcoming():
            runs = client.post("/flow_runs/filter", json={
                "deployments": {"id": {"any_": [registered["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
            return [r for r in runs if r["auto_scheduled"]]

        # the server's scheduler turns the cron schedule into upcoming runs, all at 03:00 UTC
        scheduled = wait_for(upcoming, 120, "the scheduler to create the cron schedule's runs", serve)
        assert all(r["expected_start_time"][11:19] == "03:00:00" for r in scheduled)

        run = client.post(f"/deployments/{registered['id']}/create_flow_run", json={"state": {"type": "SCHEDULED"}})
        run.raise_for_status()
        run_id = run.json()["id"]

        def finished():
            state = client.get(f"/flow_runs/{run_id}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, 600, "the triggered run to finish", serve)
        assert state["type"] == "COMPLETED", (state, (tmp_path / "serve.log").read_text()[-4000:])
    finally:
        stop_process_group(serve, signal.SIGINT)
        log.close()
    # its outputs, relative to the params file's directory
    for path in ("reports/audit/summary.json", "reports/audit/report.html", "reports/audit/scores.parquet",
                 "reports/index.html", "data/filtered/train/card.json"):
        assert (tmp_path / path).exists(), path
    metrics = yaml.safe_load((tmp_path / "reports/audit/metrics.json").read_text())
    assert metrics["poisoned_classes"] >= 1 and metrics["tpr"] >= 0.9  # the canaries were found
    # the audit subflow published its markdown and table artifacts (this server has seen no other run)
    artifacts = client.post("/artifacts/filter", json={}).json()
    by_key = {a["key"]: a for a in artifacts}
    assert {"audit-report", "audit-classes"} <= set(by_key), sorted(by_key)
    assert f"{metrics['num_flagged']}" in by_key["audit-report"]["data"]
