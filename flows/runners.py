"""How a command's flows run: where their mapped tasks go (threads in this process, or Dask worker
processes), and what Prefect keeps alive beside them."""

from __future__ import annotations

import contextlib
from typing import Iterator

from prefect.settings import get_current_settings, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner


def task_runner_for(dask: str | None, workers: int):
    """Threads in this process by default; Dask worker processes with `dask: local` (a LocalCluster of
    `workers` single-threaded workers) or any running Dask scheduler (`dask: tcp://host:8786`).

    Task bodies must be thin calls into module-level functions: Dask pickles a task by value, and a
    body that closes over torch objects drags in `torch.classes`, which does not pickle.
    """
    if dask is None:
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if dask == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return DaskTaskRunner(address=dask)


@contextlib.contextmanager
def flow_runs_bound_to_this_process() -> Iterator[None]:
    """Flow runs started by a `robustdata` command (a DVC stage, a shell) without Prefect heartbeats,
    unless the user configured them (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, or a Prefect profile).

    Heartbeats let an automation mark a deployment's run as crashed when its worker dies unseen. A
    command's run lives and dies with the command, whose exit status tells its caller. And they cost
    time: Prefect's heartbeat thread sleeps in 1 s steps and every flow run joins it at its end, so a
    run ends only on the next whole second after its start (up to 1 s a flow run; about 10 s over the
    quick profile's stages). Deployment runs (`robustdata serve`) keep Prefect's default.
    """
    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield
