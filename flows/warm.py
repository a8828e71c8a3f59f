"""A warm runner for `dvc repro` stages: each stage forked from one process that has already
imported torch, Prefect and the flows.

Every DVC stage is a `robustdata ...` process, and importing torch, Prefect and matplotlib takes
about 2.8 s of each one's start: over the quick profile's 21 stages, about 7% of its wall time for
nothing. `robustdata repro` starts this runner beside the Prefect server and gives the stages its
socket (ROBUSTDATA_WARM_SOCKET). A stage's `robustdata` process then imports nothing heavy: it
connects, passes its argv, working directory, environment and its stdin/stdout/stderr (SCM_RIGHTS),
and exits with the exit code of a child that the runner forked to run the command. To the command
the child is a fresh process: module state copied from a parent that never ran a command, the
stage's own directory, environment and file descriptors, its own process group.

The runner only serves stages whose environment agrees with its own where the preloaded modules
read it at import time (PREFECT_*, thread counts); any other stage, or any stage while the runner is
starting or gone, runs in its own process as before. Nothing here changes what a stage computes.

    python -m flows.warm SOCKET_PATH    (started by `robustdata repro`; stopped with SIGTERM)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator

SOCKET_ENV = "ROBUSTDATA_WARM_SOCKET"
# what a stage process imports (torch, Prefect, matplotlib through the flows and the report)
PRELOAD = ("torch", "robustdata.cli", "flows.ingest", "flows.train", "flows.audit", "flows.robustify",
           "flows.pipeline", "tasks.report")
# environment the preloaded modules read at import: a stage that differs here runs cold
IMPORT_TIME_ENV = ("PREFECT_", "OMP_", "MKL_", "TORCH_", "PYTORCH_", "CUDA_VISIBLE_DEVICES", "ROBUSTDATA_")
HEADER = struct.Struct("!I")  # length of the JSON request that follows the file descriptors
COLD, STARTED, DONE = b"C", b"S", b"D"  # replies: run it yourself | running | finished, then the exit code
EXIT_CODE = struct.Struct("!i")


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV) and k != SOCKET_ENV}


# ------------------------------------------------------------------------------------------------ client


def forward(argv: list[str]) -> int | None:
    """Run this command in the warm runner and return its exit code; None when no runner can take it
    (none started, still starting, gone, or a different environment): the caller then runs it itself."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(path)
        except OSError:
            return None
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        # if this process is killed, the closed connection tells the runner to stop the command
        if receive_exactly(conn, 1) != STARTED:
            return None  # refused, or the runner went away before starting anything
        reply = receive_exactly(conn, 1 + EXIT_CODE.size)
        if reply[:1] != DONE:  # started but never finished: do not run it a second time
            print("robustdata: the warm stage runner stopped while this command ran", file=sys.stderr)
            return 128 + signal.SIGTERM
        return EXIT_CODE.unpack(reply[1:])[0]


def receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------------------------------------ runner


def serve(path: Path) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    baseline = import_time_env(dict(os.environ))
    if threading.active_count() > 1:  # a fork copies no threads but may copy a lock one of them held
        log(f"not serving: the imports started threads {[t.name for t in threading.enumerate()]}")
        return  # no socket: every stage runs cold
    # stopped while a command runs: SystemExit unwinds wait_for, which stops the command first
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path) + ".binding")
        listener.listen()
        os.replace(str(path) + ".binding", path)  # clients see the socket only once it accepts
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    handle(conn, baseline)
                except (OSError, ValueError, KeyError, struct.error) as exc:  # a client gone, or nonsense
                    log(f"dropped a request: {exc!r}")


def handle(conn: socket.socket, baseline: dict[str, str]) -> None:
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    try:
        request = json.loads(receive_exactly(conn, HEADER.unpack(header)[0]))
        if len(fds) != 3 or import_time_env(request["env"]) != baseline:
            log(f"cold: {request['argv'][1:]} (environment differs from the runner's)")
            conn.sendall(COLD)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_command(request, fds)  # never returns
        started = time.perf_counter()
        with contextlib.suppress(OSError):  # the stage may be gone already: wait_for stops the command
            conn.sendall(STARTED)
        code = wait_for(pid, conn)
        log(f"warm: {request['argv'][1:]} -> exit {code} in {time.perf_counter() - started:.1f} s")
        with contextlib.suppress(OSError):
            conn.sendall(DONE + EXIT_CODE.pack(code))
    finally:
        for fd in fds:
            os.close(fd)


def run_command(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage's process and run the CLI; exits with its code."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group, so the runner can stop it with everything it started
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        sys.stdout.reconfigure(line_buffering=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({k: v for k, v in request["env"].items() if k != SOCKET_ENV})  # nested calls run cold
        sys.argv = request["argv"]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from robustdata.cli import app

        app(args=request["argv"][1:], prog_name="robustdata")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # a bug in the command: shown as a cold run would show it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_for(pid: int, conn: socket.socket) -> int:
    """The child's exit code (128 + signal if killed). The child is stopped if the stage process goes
    away (killed, Ctrl-C) or the runner itself is stopped: a command never outlives its stage."""
    finished = False
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished = True
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code
            readable, _, _ = select.select([conn], [], [], 0.2)
            if readable and not conn.recv(1, socket.MSG_PEEK):  # the stage process is gone
                stop(pid)
    finally:
        if not finished:
            stop(pid)


def stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
        os.killpg(pid, signal.SIGTERM)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


@contextlib.contextmanager
def warm_runner(env: dict[str, str], log_path: Path) -> Iterator[dict[str, str]]:
    """Start a runner with `env`; yield `env` plus its socket, for the stages' environment. The runner
    starts in the background: stages that begin before it is ready run cold."""
    from flows.server import stop_process_group

    with tempfile.TemporaryDirectory(prefix="robustdata-warm-") as tmp, open(log_path, "w") as output:
        path = Path(tmp) / "stages.sock"
        runner_env = {k: v for k, v in env.items() if k != SOCKET_ENV}
        process = subprocess.Popen([sys.executable, "-m", "flows.warm", str(path)], env=runner_env,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=Path(__file__).resolve().parents[1])
        try:
            yield {**runner_env, SOCKET_ENV: str(path)}
        finally:
            stop_process_group(process, signal.SIGTERM, timeout=10)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
