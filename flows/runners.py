"""Where a flow's mapped tasks run: threads in this process, or Dask worker processes."""

from __future__ import annotations

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
