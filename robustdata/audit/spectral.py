"""Per-class principal directions and spectral-signature scores (Tran, Li, Madry 2018).

Within a class, poisons shift the representation covariance toward one
direction, so they stand out on the top singular vectors of the *centred*
class matrix. The score is the centred squared projection, summed over the
top-k directions. (The original code and IBM ART use an uncentred |<v, x>|,
which ranks by distance from the origin rather than from the class mean.)

All the audit methods start from the same per-class PCA, computed once with a
seeded randomized range finder (Halko, Martinsson, Tropp 2011): a full
covariance of 1024-3136-dim features costs more than the inference pass the
features came from. (The streaming audit, streaming.py, builds the same
ClassPCA from an exact eigendecomposition of an accumulated covariance.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ClassPCA:
    """One class's representations in its own principal coordinates."""

    index: torch.Tensor       # (n,) row indices into the audited set
    coords: torch.Tensor      # (n, q) centred projections on the top-q principal directions
    variances: torch.Tensor   # (q,) variance along each direction, descending
    mean: torch.Tensor        # (D,) class mean
    directions: torch.Tensor  # (D, q) orthonormal principal directions
    total_variance: float = math.inf  # sum of the variances of all D coordinates (tells a constant class)


def top_principal(x: torch.Tensor, rank: int, generator: torch.Generator, power_iterations: int = 2,
                  oversample: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (D, rank), singular values (rank,)) of the centred matrix x (n, D).

    Randomized SVD: project on a seeded Gaussian sketch, refine by power
    iterations (each re-orthonormalised, as accuracy needs in float32), then an
    exact SVD of the small (l, D) matrix.
    """
    width = min(rank + oversample, *x.shape)
    sketch = torch.randn(x.shape[1], width, generator=generator, device=generator.device).to(x)
    basis = torch.linalg.qr(x @ sketch).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    _, singular, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    rank = min(rank, width)
    return vh[:rank].T, singular[:rank]


def class_pca(features: torch.Tensor, labels: torch.Tensor, label: int, rank: int,
              generator: torch.Generator) -> ClassPCA:
    index = torch.nonzero(labels == label).flatten()
    x = features[index]
    mean = x.mean(0)
    centred = x - mean
    # float32 for the big products (features are float32 anyway); float64 from here on, where it is cheap
    directions, singular = top_principal(centred, rank, generator)
    coords = (centred @ directions).double()
    directions, singular = directions.double(), singular.double()
    # sign convention: the direction's heavy side is positive, so plots and splits are stable
    skew = (coords ** 3).sum(0).sign()
    skew[skew == 0] = 1
    total_variance = float(torch.linalg.vector_norm(centred)) ** 2 / max(len(index) - 1, 1)  # a reduction, no copy
    return ClassPCA(index, coords * skew, singular ** 2 / max(len(index) - 1, 1), mean.double(),
                    directions * skew, total_variance)


def spectral_signature_scores(pca: ClassPCA, k: int = 1) -> torch.Tensor:
    """Centred squared projection on the top-k directions, (n,)."""
    return (pca.coords[:, :k] ** 2).sum(1)
