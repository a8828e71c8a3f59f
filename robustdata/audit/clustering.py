"""Activation clustering (Chen et al. 2018), the baseline.

Per class: the top 10 principal coordinates, 2-means, and the smaller cluster
is flagged when it holds less than 35% of the class. The score (for AUROC and
ranking) is how much closer a point lies to the smaller cluster's centre than
to the larger one's.
"""

from __future__ import annotations

import torch

DIMS = 10
MAX_SMALL_FRACTION = 0.35


def two_means(x: torch.Tensor, generator: torch.Generator, restarts: int = 4, iterations: int = 50
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment (n,) in {0, 1}, centres (2, d)): the best of `restarts` k-means++ starts by inertia.

    One start often splits a class down its natural middle and misses a small
    tight cluster that another start finds; restarts are cheap at 10 dims.
    """
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(restarts):
        assignment, centres = lloyd(x, kmeans_pp(x, generator), iterations)
        inertia = float(((x - centres[assignment]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assignment, centres)
    return best[1], best[2]


def kmeans_pp(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two k-means++ starting centres (2, d)."""
    first = torch.randint(len(x), (1,), generator=generator, device=x.device)
    distance = ((x - x[first]) ** 2).sum(1)
    second = torch.multinomial(distance / distance.sum(), 1, generator=generator)
    return torch.cat([x[first], x[second]])


def lloyd(x: torch.Tensor, centres: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations for two centres: a point joins centre 1 when it lies past the bisecting
    hyperplane, x.(c1 - c0) > (|c1|^2 - |c0|^2) / 2 (one matrix-vector product, no distance matrix)."""
    assignment = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    for _ in range(iterations):
        new = (x @ (centres[1] - centres[0]) > ((centres[1] ** 2).sum() - (centres[0] ** 2).sum()) / 2).long()
        if torch.equal(new, assignment):
            break
        assignment = new
        for j in range(2):
            members = x[assignment == j]
            if len(members):
                centres[j] = members.mean(0)
    return assignment, centres


def activation_clustering(coords: torch.Tensor, generator: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(scores (n,), flagged (n,), details) of one class's principal coordinates (n, q)."""
    x = coords[:, :DIMS]
    assignment, centres = two_means(x, generator)
    sizes = torch.bincount(assignment, minlength=2)
    small = int(sizes.argmin())
    # |x - c_big|^2 - |x - c_small|^2, expanded: linear in x
    big_centre, small_centre = centres[1 - small], centres[small]
    scores = 2 * x @ (small_centre - big_centre) + (big_centre ** 2).sum() - (small_centre ** 2).sum()
    fraction = float(sizes[small]) / len(x)
    flagged = (assignment == small) & (fraction < MAX_SMALL_FRACTION)
    return scores, flagged, {"small_cluster_fraction": fraction}
