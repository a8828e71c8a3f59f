"""robustdata: trustworthy image training sets.

Layers (DESIGN.md section 2; import-linter checks them in the test run, see pyproject.toml):

    robustdata.cli, robustdata.api     entry points: parse, validate, call flows
    robustdata.flows  (flows/)         Prefect flows: order, parallelism, artifacts, schedules
    robustdata.tasks  (tasks/)         Prefect tasks: paths in -> library -> paths + summaries out
    the library                        config, data, train, poison, audit, robustify, report, io: pure
                                       compute and IO, never imports Prefect

The Python API is robustdata.api (`from robustdata import api; api.audit(...)`), not this package's
namespace: here `robustdata.audit` is the audit library, and importing it must stay light.
"""

from robustdata.version import __version__

__all__ = ["__version__"]
