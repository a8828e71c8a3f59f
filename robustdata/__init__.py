"""robustdata: trustworthy image training sets.

The library layer: pure compute and IO helpers. It never imports Prefect;
`tasks/` and `flows/` wrap it. The Python API (robustdata.audit(...),
robustdata.build(...), ...: robustdata/api.py) runs those flows, and is
imported on first use so that `import robustdata` stays light.
"""

from typing import Any

from robustdata.allocator import keep_freed_memory

__version__ = "0.1.0"

API = ("audit", "build", "evaluate", "fit", "ingest", "load_params", "pipeline", "plant_poisons")
__all__ = ["__version__", *API]

# every entry (CLI, API, DVC stage, Dask worker, the plain library calls) trains or attacks models on CPU
# in this process: robustdata/allocator.py says why the allocator's defaults cost them seconds per run
keep_freed_memory()


def __getattr__(name: str) -> Any:
    if name in API:
        from robustdata import api

        return getattr(api, name)
    raise AttributeError(f"module 'robustdata' has no attribute {name!r}")
