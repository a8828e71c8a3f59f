"""Prefect flows: the order of steps, parallelism, retries, artifacts.

Importing any flow also mends one Prefect behaviour for the processes a flow's process forks (torch
DataLoader workers, multiprocessing): Prefect 3.8's queue services (events, logs) register a drain at
interpreter exit, and reset themselves in a forked child without unregistering it, so the child's drain
fails an assertion (`_done_event is not None`) and every forked process exits with code 1 once a flow has
run in its parent. A child has nothing of its parent's to drain: there the drain is a no-op.
"""

import os

from prefect._internal.concurrency import services as _prefect_services


def _no_drain_in_forked_child() -> None:
    for service in list(_prefect_services._active_services):
        service.drain = lambda at_exit=False: True  # the exit hook calls self.drain: this instance's, now


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_drain_in_forked_child)
