"""robustdata: trustworthy image training sets.

Layers (DESIGN.md section 2; import-linter checks them in the test run, see pyproject.toml):

    robustdata.cli, robustdata.api     entry points: parse, validate, call flows
    robustdata.flows  (flows/)         Prefect flows: order, parallelism, artifacts, schedules
    robustdata.tasks  (tasks/)         Prefect tasks: paths in -> library -> paths + summaries out
    the library                        config, data, train, audit, robustify, report, io: pure compute
                                       and IO, never imports Prefect

This module is the Python API's facade: `robustdata.audit(...)`, `robustdata.build(...)` and the
other names in API load robustdata.api on first use, so that importing the library stays light.
"""

from typing import Any

from robustdata.version import __version__

API = ("audit", "build", "evaluate", "fit", "ingest", "load_params", "pipeline", "plant_poisons")
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        from robustdata import api

        return getattr(api, name)
    raise AttributeError(f"module 'robustdata' has no attribute {name!r}")
