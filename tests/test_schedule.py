"""A real Prefect server on loopback, the scheduled-audit deployment registered by `robustdata serve`,
a run triggered through the API: it completes and writes its reports and artifacts. Every call to a server
goes through Prefect's client, which retries a busy server's 503s; a stub server that answers 503 before
it answers checks that the product's calls survive them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, DeploymentFilterName,
                                            FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import Artifact, FlowRun, StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from robustdata.flows.schedule import trigger_audit

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


def listing(sort) -> dict[str, Any]:
    """limit and sort for a `read_*` call: Prefect 3.8.8's client sends null for those left out, and its
    server answers 422 to a null."""
    return {"limit": 200, "sort": sort}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture()
def real_server(tmp_path):
    """`prefect server start` (every service, the scheduler among them) on a free loopback port with its own
    home; yields the API URL, and Prefect's settings point at it for the test."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                wait_for(lambda: client.api_healthcheck() is None, 180, "the Prefect server to answer", server)
            yield url
    finally:
        stop_group(server, signal.SIGTERM)


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
    try:
        with get_client(sync_client=True) as client:  # Prefect's client: a busy server's 503s are retried
            def deployment():
                found = client.read_deployments(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["nightly"])), **listing(DeploymentSort.NAME_ASC))
                return found[0] if found else None

            registered = wait_for(deployment, 180, "the deployment to be registered", serve)
            assert [s.schedule.cron for s in registered.schedules] == ["0 3 * * *"]
            assert registered.schedules[0].active

            def upcoming():
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[registered.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))), **listing(FlowRunSort.ID_DESC))
                return [r for r in runs if r.auto_scheduled]

            # the server's scheduler turns the cron schedule into upcoming runs, all at 03:00 UTC
            scheduled = wait_for(upcoming, 120, "the scheduler to create the cron schedule's runs", serve)
            assert all(r.expected_start_time.astimezone(timezone.utc).strftime("%H:%M:%S") == "03:00:00"
                       for r in scheduled)

            run_id = UUID(trigger_audit("nightly"))  # the product's own call, as a user's script would make it

            def finished():
                state = client.read_flow_run(run_id).state
                return state if state is not None and state.is_final() else None

            state = wait_for(finished, 600, "the triggered run to finish", serve)
            assert state.type == StateType.COMPLETED, (state, (tmp_path / "serve.log").read_text()[-4000:])
            # the audit subflow published its artifacts (this server has seen no other run)
            # the route itself, through the same retrying client: 3.8.8's read_artifacts() sends null filters,
            # which its server refuses, and an empty task-run filter leaves out a flow's own artifacts
            artifacts = Artifact.model_validate_list(
                client.request("POST", "/artifacts/filter", json={"limit": 200}).json())
            by_key = {a.key: a for a in artifacts}
    finally:
        stop_group(serve, signal.SIGINT)
        log.close()
    # its outputs, relative to the params file's directory
    for path in ("reports/audit/summary.json", "reports/audit/report.html", "reports/audit/scores.parquet",
                 "reports/index.html", "data/filtered/train/card.json"):
        assert (tmp_path / path).exists(), path
    metrics = yaml.safe_load((tmp_path / "reports/audit/metrics.json").read_text())
    assert metrics["poisoned_classes"] >= 1 and metrics["tpr"] >= 0.9  # the canaries were found
    assert {"audit-report", "audit-classes"} <= set(by_key), sorted(by_key)
    assert f"{metrics['num_flagged']}" in str(by_key["audit-report"].data)


class FlakyPrefectAPI(BaseHTTPRequestHandler):
    """A stub of the two routes that trigger_audit calls: each answers `503 Service Unavailable` (Retry-After:
    0, so the client's backoff takes no time) to its first FAILURES requests, then its canned JSON."""

    FAILURES = 2
    deployment = DeploymentResponse(id=uuid4(), name="nightly", flow_id=uuid4())
    flow_run = FlowRun(id=uuid4(), name="stub-run", flow_id=deployment.flow_id, deployment_id=deployment.id)
    routes = {("GET", "/api/deployments/name/scheduled-audit/nightly"): deployment,
              ("POST", f"/api/deployments/{deployment.id}/create_flow_run"): flow_run}
    seen: Counter = Counter()

    def answer(self, method: str) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        route = (method, self.path)
        if route not in self.routes:  # /csrf-token among them: a 404 tells the client CSRF is off
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.seen[route] += 1
        if self.seen[route] <= self.FAILURES:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.routes[route].model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self.answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.answer("POST")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def flaky_api():
    FlakyPrefectAPI.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyPrefectAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def test_triggering_an_audit_survives_a_busy_server_answering_503(flaky_api):
    with temporary_settings(updates={PREFECT_API_URL: flaky_api}):
        run_id = trigger_audit("nightly")
    assert run_id == str(FlakyPrefectAPI.flow_run.id)
    # each call was answered 503 twice and retried: the third answer was the one used
    assert dict(FlakyPrefectAPI.seen) == {route: FlakyPrefectAPI.FAILURES + 1 for route in FlakyPrefectAPI.routes}
