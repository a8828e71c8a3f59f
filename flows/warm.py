"""A warm runner for `dvc repro` stages: the stages' commands run one after another in one warm
process, as the same calls would in one Python program.

Every DVC stage is a `robustdata ...` process, and a fresh process pays a warm-up on top of its
work: about 2.8 s of imports (torch, Prefect, matplotlib), then its first training steps, attacks and
Prefect flow run run slower than later ones. Over the quick profile's 21 stages that came to 25%
of the pipeline's wall time (benchmarks/pipeline.py). `robustdata repro` starts this runner beside
the Prefect server and gives the stages its socket (ROBUSTDATA_WARM_SOCKET). A stage's `robustdata`
process then imports nothing heavy: it connects, passes its argv, working directory, environment
and its stdin/stdout/stderr (SCM_RIGHTS), and exits with the command's exit code.

The runner itself only imports. It forks a worker, which runs each command in itself with the
stage's file descriptors, directory, environment and argv, and afterwards puts back what a command
may change of a process (ProcessState: those, torch's thread count and seeds, Python's and numpy's
random state, signal handlers). A command that fails retires the worker, and the next command gets
a fresh one. A killed stage, or a stopped runner, stops the worker with its process group.

The runner only serves stages whose environment agrees with its own where the preloaded modules
read it at import time (PREFECT_*, thread counts); any other stage, or any stage while the runner is
starting or gone, runs in its own process as before. Nothing here changes what a stage computes.

    python -m robustdata.flows.warm SOCKET_PATH    (started by `robustdata repro`; stopped with SIGTERM)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import random
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SOCKET_ENV = "ROBUSTDATA_WARM_SOCKET"
# what a stage process imports (torch, Prefect, matplotlib through the flows and the report)
PRELOAD = ("torch", "robustdata.cli", "robustdata.flows.ingest", "robustdata.flows.train", "robustdata.flows.audit", "robustdata.flows.robustify",
           "robustdata.flows.pipeline", "robustdata.tasks.report")
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
    worker: Worker | None = None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path) + ".binding")
            listener.listen()
            os.replace(str(path) + ".binding", path)  # clients see the socket only once it accepts
            while True:
                # forked before a stage connects, so that it holds none of a stage's file descriptors
                worker = worker if worker is not None else Worker(listener)
                conn, _ = listener.accept()
                with conn:
                    try:
                        worker = handle(conn, baseline, worker)
                    except (OSError, ValueError, KeyError, struct.error) as exc:  # a client gone, or nonsense
                        log(f"dropped a request: {exc!r}")
    finally:
        if worker is not None:
            worker.close()


def handle(conn: socket.socket, baseline: dict[str, str], worker: Worker) -> Worker | None:
    """Run one stage's command in the worker; the worker to use next (None: fork a fresh one)."""
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    try:
        request = json.loads(receive_exactly(conn, HEADER.unpack(header)[0]))
        if len(fds) != 3 or import_time_env(request["env"]) != baseline:
            log(f"cold: {request['argv'][1:]} (environment differs from the runner's)")
            conn.sendall(COLD)
            return worker
        started = time.perf_counter()
        worker.send(request, fds)
        with contextlib.suppress(OSError):  # the stage may be gone already: wait_for stops the command
            conn.sendall(STARTED)
        code = worker.wait_for(conn)
        log(f"warm: {request['argv'][1:]} -> exit {code} in {time.perf_counter() - started:.1f} s "
            f"(worker {worker.pid}, command {worker.commands})")
        with contextlib.suppress(OSError):
            conn.sendall(DONE + EXIT_CODE.pack(code))
        if code != 0:  # a failed command may leave state behind: the next one gets a fresh worker
            worker.close()
            return None
        return worker
    finally:
        for fd in fds:
            os.close(fd)


class Worker:
    """A child forked from the runner that runs the stages' commands one after another, in itself.

    Forking a child per command saves the imports but not the rest of a process's warm-up: the
    allocator's and oneDNN's first steps, Prefect's first flow run. With one worker, stage after
    stage runs in a warm process, as the same calls do in one Python program. Between commands the
    worker puts back what a command may change of its process (ProcessState), and a command that
    fails retires it.
    """

    def __init__(self, listener: socket.socket) -> None:
        self.channel, child_end = socket.socketpair()
        self.commands = 0
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            listener.close()
            self.channel.close()
            os._exit(work(child_end))
        child_end.close()
        log(f"worker {self.pid} started")

    def send(self, request: dict, fds: list[int]) -> None:
        payload = json.dumps(request).encode()
        socket.send_fds(self.channel, [HEADER.pack(len(payload))], fds)
        self.channel.sendall(payload)
        self.commands += 1

    def wait_for(self, conn: socket.socket) -> int:
        """The command's exit code (128 + signal if the worker was killed). The worker is stopped if the
        stage process goes away (killed, Ctrl-C) or the runner itself is stopped: a command never
        outlives its stage."""
        finished = False
        try:
            while True:
                readable, _, _ = select.select([conn, self.channel], [], [], 0.5)
                if self.channel in readable:
                    reply = receive_exactly(self.channel, EXIT_CODE.size)
                    if len(reply) == EXIT_CODE.size:
                        finished = True
                        return EXIT_CODE.unpack(reply)[0]
                    return self.reap()  # the worker died in the command (os._exit, a crash)
                if conn in readable and not conn.recv(1, socket.MSG_PEEK):  # the stage process is gone
                    return self.stop()
        finally:
            if not finished:
                self.stop()

    def stop(self) -> int:
        """SIGTERM to the worker's process group (the command and whatever it started); its exit code."""
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
        return self.reap()

    def reap(self, timeout: float = 30) -> int:
        """Wait for the worker to exit (SIGKILL after `timeout`); its exit code, 128 + signal if killed."""
        if self.pid <= 0:
            return 0
        deadline = time.monotonic() + timeout
        while (result := os.waitpid(self.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                result = os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        self.pid = -1
        code = os.waitstatus_to_exitcode(result[1])
        return code if code >= 0 else 128 - code

    def close(self) -> None:
        """Let the worker finish (its exit handlers flush Prefect's logs), or stop it after a while."""
        if self.pid > 0:
            self.channel.close()
            self.reap(timeout=10)


# ------------------------------------------------------------------------------------------------ worker


def work(channel: socket.socket) -> int:
    """In the worker: run each command the runner sends, in this process, until the runner lets go."""
    os.setpgid(0, 0)  # its own group, so the runner can stop it with everything a command started
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdout.reconfigure(line_buffering=True)
    fresh = ProcessState.capture()
    try:
        while True:
            try:
                header, fds, _, _ = socket.recv_fds(channel, HEADER.size, 3)
            except OSError:
                header = b""
            if len(header) != HEADER.size:  # the runner let go
                return 0
            request = json.loads(receive_exactly(channel, HEADER.unpack(header)[0]))
            try:
                code = run_command(request, fds)
            finally:
                fresh.restore()
                for fd in fds:
                    os.close(fd)
            channel.sendall(EXIT_CODE.pack(code))
            if code != 0:
                return code
    finally:
        atexit._run_exitfuncs()  # what a process's exit runs: Prefect drains its log and event queues


def run_command(request: dict, fds: list[int]) -> int:
    """Become the stage's process (its stdin/stdout/stderr, directory, environment, argv) and run the CLI."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({k: v for k, v in request["env"].items() if k != SOCKET_ENV})  # nested calls run cold
    sys.argv = request["argv"]
    from robustdata.cli import app

    try:
        app(args=request["argv"][1:], prog_name="robustdata")
        return 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exit_status(exc)
    except BaseException:  # a bug in the command: shown as a cold run would show it
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def exit_status(stop: SystemExit) -> int:
    """The status a process leaving with `stop` exits with: its int code, 0 for None, 1 for a message."""
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)


@dataclass
class ProcessState:
    """What a command may change of the process it runs in, as a fresh process has it: put back after
    every command so that the next one starts as it would in its own process."""

    cwd: str
    env: dict[str, str]
    argv: list[str]
    std_fds: list[int]  # duplicates of the worker's own stdin/stdout/stderr
    torch_threads: int
    torch_seed: int
    torch_random: object
    python_random: object
    numpy_random: dict
    signals: dict[int, object]

    @classmethod
    def capture(cls) -> ProcessState:
        import numpy
        import torch

        return cls(cwd=os.getcwd(), env=dict(os.environ), argv=list(sys.argv),
                   std_fds=[os.dup(fd) for fd in (0, 1, 2)], torch_threads=torch.get_num_threads(),
                   torch_seed=torch.initial_seed(), torch_random=torch.random.get_rng_state(),
                   python_random=random.getstate(),
                   numpy_random=numpy.random.get_state(legacy=False),
                   signals={s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)})

    def restore(self) -> None:
        import numpy
        import torch

        for target, fd in enumerate(self.std_fds):
            os.dup2(fd, target)
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.env)
        sys.argv = list(self.argv)
        torch.set_num_threads(self.torch_threads)
        torch.manual_seed(self.torch_seed)  # every CUDA generator as at a process's start (the CPU one too)
        torch.random.set_rng_state(self.torch_random)  # the CPU generator exactly where it was
        random.setstate(self.python_random)
        numpy.random.set_state(self.numpy_random)
        for number, handler in self.signals.items():
            signal.signal(number, handler)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


@contextlib.contextmanager
def warm_runner(env: dict[str, str], log_path: Path, ready_timeout: float = 60) -> Iterator[dict[str, str]]:
    """Start a runner with `env`; yield `env` plus its socket, for the stages' environment, once it serves
    (or after `ready_timeout` s, or if it exits: stages that find no runner run cold)."""
    from robustdata.flows.server import stop_process_group

    with tempfile.TemporaryDirectory(prefix="robustdata-warm-") as tmp, open(log_path, "w") as output:
        path = Path(tmp) / "stages.sock"
        runner_env = {k: v for k, v in env.items() if k != SOCKET_ENV}
        process = subprocess.Popen([sys.executable, "-m", "robustdata.flows.warm", str(path)], env=runner_env,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=Path(__file__).resolve().parents[1])
        try:
            # give it the seconds its imports take, so that the first stage is warm too
            deadline = time.monotonic() + ready_timeout
            while not path.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            yield {**runner_env, SOCKET_ENV: str(path)}
        finally:
            stop_process_group(process, signal.SIGTERM, timeout=30)


def main(path: Path) -> None:
    """Serve until stopped, then leave without the interpreter's teardown: unloading torch and Prefect
    takes about 1.4 s, every `robustdata repro` would wait for it, and the runner has nothing to flush
    (the worker ran the commands, and its exit handlers ran in it)."""
    code = 0
    try:
        serve(path)
    except SystemExit as stop:
        code = exit_status(stop)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
