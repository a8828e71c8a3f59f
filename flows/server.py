"""One Prefect server for the length of a command: `robustdata repro` shares it with every stage of its
`dvc repro`, instead of each stage's flow starting (and waiting ~12 s for) a temporary server of its own.

The server is the one Prefect itself starts for a flow run that has no API: prefect.server.api.server's
SubprocessASGIServer (uvicorn serving Prefect's app, with the services a temporary server runs), here on
a free loopback port and stopped when the block ends. Schedules need a full server (`robustdata server`).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

from robustdata.errors import RobustDataError

START_TIMEOUT_S = 180  # a busy 2-core machine has taken over a minute; Prefect's own default is 20 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """Yield the API URL of a Prefect server: the configured one (PREFECT_API_URL, from the environment or
    a Prefect profile) when set, else a temporary server on a free loopback port, stopped on exit."""
    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    # a port of our own: SubprocessASGIServer() with none is the process's default, which flow calls share
    server = SubprocessASGIServer(port=free_port())
    try:
        try:
            server.start(timeout=START_TIMEOUT_S)
        except (RuntimeError, httpx.HTTPError) as exc:  # it exited, never answered, or answered with an error
            raise RobustDataError(f"the Prefect server did not start: {exc}") from exc
        yield server.api_url
    finally:
        server.stop()  # also after a failed start, and when an exception or a stop signal unwinds the block
