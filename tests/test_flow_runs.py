"""A command's flow runs send no Prefect heartbeats unless the user configured them (flows/runners.py says
why): checked on the events the test server received."""

from __future__ import annotations

import multiprocessing
import time

import torch
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import temporary_settings

import robustdata.flows  # noqa: F401  (its fork mend is what the last test checks)
from robustdata.cli import run_guarded

HEARTBEAT = "prefect.flow-run.heartbeat"


@flow
def short_run() -> str:
    from prefect.runtime import flow_run

    time.sleep(0.3)  # the heartbeat thread sends its first beat as the run starts
    return flow_run.id


def flow_runs_with_heartbeats(runs: list[str], expected: list[str], timeout: float = 60) -> set[str]:
    """Which of `runs` the server got heartbeats from, once it has them from all of `expected` (or after
    `timeout`): events reach the server asynchronously, so an absence counts only once later runs arrived."""
    wanted = EventFilter(event=EventNameFilter(name=[HEARTBEAT]),
                         resource=EventResourceFilter(id=[f"prefect.flow-run.{run}" for run in runs]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(wanted, limit=50)
            beating = {event.resource.id.removeprefix("prefect.flow-run.") for event in page.events}
            if set(expected) <= beating or time.monotonic() > deadline:
                return beating
            time.sleep(0.5)


def test_command_flow_runs_send_no_heartbeat_unless_configured():
    with temporary_settings(updates={"flows.heartbeat_frequency": 30}):  # a user's setting
        configured = run_guarded(short_run)
    default = short_run()  # Prefect's default outside a command: heartbeats on
    command = run_guarded(short_run)
    not_a_flow_command = run_guarded(short_run, runs_flows=False)

    beating = flow_runs_with_heartbeats([configured, default, command, not_a_flow_command],
                                        expected=[configured, default, not_a_flow_command])
    assert default in beating, "the control run's heartbeat never reached the server: the check proves nothing"
    assert configured in beating, "a heartbeat frequency the user set must be kept"
    assert not_a_flow_command in beating
    assert command not in beating


class Counting(torch.utils.data.IterableDataset):
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        yield from (torch.tensor(i) for i in range(info.id, 40, info.num_workers))


def test_processes_forked_after_an_in_process_flow_exit_cleanly():
    """Prefect's services leave an exit hook that fails in a forked child (flows/__init__.py mends it): without
    the mend, every DataLoader worker started after a flow exits with code 1 and the loader raises."""
    @flow
    def tiny() -> int:
        return 1

    assert tiny() == 1
    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()
    child.join()
    assert child.exitcode == 0
    batches = list(torch.utils.data.DataLoader(Counting(), batch_size=10, num_workers=2))
    assert sorted(torch.cat(batches).tolist()) == list(range(40))
