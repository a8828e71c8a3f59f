"""robustdata: trustworthy image training sets.

The library layer: pure compute and IO helpers. It never imports Prefect;
`tasks/` and `flows/` wrap it.
"""

__version__ = "0.1.0"
