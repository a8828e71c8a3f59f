"""A stopped command leaves no process behind.

`robustdata train` with no PREFECT_API_URL runs its flow against the temporary server Prefect starts for
it (a uvicorn child process). SIGTERM or SIGINT sent to the command while that flow trains must stop the
server too; `robustdata repro` stopped while a stage runs must stop dvc, the stage and its own server.
Processes are read from /proc: the command's descendants just before the signal must all be gone after.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from formats import make_imagefolder
from robustdata.data.ingest import ingest_split
from robustdata.data.sources import ImageFolderSource

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

BIN = Path(sys.executable).parent
EPOCH_ENDED = "epoch 1/"  # the progress line at the end of the first epoch: the flow's body is running
TRAIN = {"arch": "small_cnn", "epochs": 1_000_000, "batch_size": 32, "lr": 0.05, "precision": "fp32",
         "device": "cpu"}  # trains until stopped


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/ and val/ of 2 classes of 16x16 images."""
    root = tmp_path_factory.mktemp("signals")
    make_imagefolder(root / "images", per_class=32, size=(16, 16), splits=["train", "val"])
    source = ImageFolderSource(root / "images")
    for split in ("train", "val"):
        ingest_split(source, split, root / "data" / split, shard_size=100, progress=False)
    return root / "data"


def train_params(directory: Path, data: Path) -> Path:
    """params.yaml that trains on `data` into directory/model: a model of its own, whose stopped run leaves a
    resume state that no other test's run resumes from."""
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump({"train_standard": {**TRAIN, "data": str(data), "out": str(directory / "model")}}))
    return path


def command_env(tmp_path: Path) -> dict[str, str]:
    """No PREFECT_API_URL: a flow run starts Prefect's temporary server (given time to start on a busy machine),
    with a database of its own (PREFECT_HOME), which no other test's server touches."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "DVC_NO_ANALYTICS": "1", "COLUMNS": "200"}


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state on (field 3); None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def descendants(pid: int) -> dict[tuple[int, str], str]:
    """(pid, start time) -> command line of every live process below `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat_fields(int(entry.name))) and fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            fields = stat_fields(child)
            if fields is not None:
                found[(child, fields[19])] = cmdline(child)  # field 22, the start time: a reused pid differs
            todo.append(child)
    return found


def still_running(processes: dict[tuple[int, str], str]) -> list[str]:
    return [command for (pid, start), command in processes.items()
            if (fields := stat_fields(pid)) and fields[0] != "Z" and fields[19] == start]


def not_progress(log: Path) -> str:
    """The output without its progress lines (one per epoch)."""
    return "\n".join(line for line in log.read_text().splitlines() if not line.startswith("epoch "))


def stop_and_check(args: list[str], cwd: Path, signum: int, tmp_path: Path, ready: list[str]) -> str:
    """Start `robustdata ARGS`, wait until its flow trains and every process named in `ready` runs below it,
    send it `signum`, and check it exits with 128 + signum leaving none of its processes behind. Its output."""
    log = tmp_path / "output.log"
    with open(log, "w") as out:
        command = subprocess.Popen([str(BIN / "robustdata"), *args], cwd=cwd, env=command_env(tmp_path), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    below: dict[tuple[int, str], str] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert command.poll() is None, f"exited with {command.returncode}:\n{not_progress(log)}"
            below = descendants(command.pid)
            training = EPOCH_ENDED in log.read_text()
            if training and all(any(name in c for c in below.values()) for name in ready):
                break
            assert time.monotonic() < deadline, \
                f"training: {training}; {ready} among {list(below.values())}?\n{not_progress(log)}"
            time.sleep(0.2)
        command.send_signal(signum)  # to the command alone, as a supervisor or `kill` sends it
        code = command.wait(timeout=120)
        time.sleep(0.5)  # a process that outlived the command would still be there; one that exits, gone
        left = still_running(below)
        assert not left, f"left behind: {left}\n{not_progress(log)}"
        assert code == 128 + signum, not_progress(log)
        return log.read_bytes().decode()  # as written: read_text() would turn each '\r' into a line end
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
        for pid, start in below:  # whatever is left (the same processes: same start times), killed
            if (fields := stat_fields(pid)) and fields[19] == start:
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_command_stops_its_temporary_prefect_server(data, tmp_path, signum):
    output = stop_and_check(["train", "--params", str(train_params(tmp_path, data))], tmp_path, signum, tmp_path,
                            ready=["uvicorn"])
    assert f"stopped: {signal.Signals(signum).name}" in output
    # progress in a log: each epoch's bar one whole line, never redrawn with '\r'
    assert re.search(r"epoch 1/1000000: 100%\|[^\r\n]*\n", output) and not re.search(r"epoch [^\n]*\r", output)
    assert not (tmp_path / "model").exists()


def test_a_stopped_repro_stops_dvc_its_stage_and_the_server(data, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    train_params(repo, data)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "robustdata train --params params.yaml"}}}))
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=repo, env=command_env(tmp_path), check=True)
    stop_and_check(["repro"], repo, signal.SIGTERM, tmp_path, ready=["uvicorn", "dvc", "robustdata train"])
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, env=command_env(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr  # dvc released its lock
