"""Shared by the attack tests (tests/test_poison_*.py): random images, generators, and no Prefect server."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison modules never import prefect."""


def images(n: int = 6, shape: tuple[int, int, int] = (1, 28, 28), low: int = 0, high: int = 256,
           seed: int = 0) -> torch.Tensor:
    return torch.randint(low, high, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
