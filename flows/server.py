"""A Prefect server for the length of a command: one server for every stage of a `dvc repro`, instead of
each stage's flow starting (and waiting ~12 s for) a temporary one of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.error import URLError
from urllib.request import urlopen

from robustdata.errors import RobustDataError

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_executable() -> str:
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.exists() else "prefect"


def healthy(api_url: str) -> bool:
    try:
        with urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


def stop_process_group(process: subprocess.Popen, sig: int, timeout: float = 30) -> None:
    """Send `sig` to the process's group (it was started with start_new_session); SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def prefect_server(log: Path | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the API URL of a Prefect server: PREFECT_API_URL when one is set, else a fresh
    `prefect server start` on a free loopback port, stopped (with its process group) on exit."""
    with starting_prefect_server(log, env) as (url, wait_until_healthy):
        wait_until_healthy()
        yield url


@contextlib.contextmanager
def starting_prefect_server(log: Path | None = None, env: dict[str, str] | None = None
                            ) -> Iterator[tuple[str, Callable[[], None]]]:
    """prefect_server, yielding as soon as the server is started: its URL, and a function that waits until
    it answers. A server takes about 3 s to answer; the caller can start other things meanwhile."""
    env = dict(os.environ if env is None else env)
    if env.get("PREFECT_API_URL"):
        yield env["PREFECT_API_URL"], lambda: None
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_UI_ENABLED", "false")
    output = open(log, "w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen([prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_healthy() -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(url):
            if process.poll() is not None:
                raise RobustDataError(f"the Prefect server exited with {process.returncode} before it was healthy"
                                      + (f"; see {log}" if log else ""))
            if time.monotonic() > deadline:
                raise RobustDataError(f"the Prefect server did not answer on {url} within {START_TIMEOUT_S} s")
            time.sleep(0.1)

    try:
        yield url, wait_until_healthy
    finally:
        stop_process_group(process, signal.SIGTERM)
        if log is not None:
            output.close()
