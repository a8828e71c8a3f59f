"""Iterative spectral filtering without knowing eps: which classes hold poisons, and which samples.

Per class, poisons form a separate cluster along one direction of the
representation space. Several directions are tried:

* the top principal direction, where a large poison cluster (a third to a
  half of the class: all-to-one at 5-10%) dominates the variance;
* the top direction of the class whitened with robust moments (the SPECTRE
  filter), where a small cluster (down to ~5% of the class) stands out; in the
  top 4, 8 and 16 principal coordinates, since a class of a few hundred samples
  cannot be whitened reliably in many dimensions;
* the centroid difference of a 2-means clustering of the top 10 coordinates.

Along each, the optimal 1-D two-means split is found and its separation
D = |mean_1 - mean_2| / sqrt((var_1 + var_2) / 2) measured. A clean class
gives D ~ 3 (a Gaussian cut at its mean gives 2.7; heavier tails a little
more), a poisoned one 7-11 on MNIST. "Larger than clean data would show" is
calibrated across the classes of the same audit: a class is poisoned when its
D exceeds median + KAPPA robust standard deviations of all classes' D (this
assumes fewer than half of the classes are poisoned).

Which side of the split is the poison? For small clusters the answer is
obvious, but at half the class (all-to-one at 10% of MNIST) size says nothing.
A poison is an image of another class with a small or faint trigger, so in
input space it still lies near its source class: the side whose members are
nearer to the *other* classes' input-space centroids is the poison side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustdata.audit.clustering import DIMS as CLUSTER_DIMS, two_means
from robustdata.audit.spectre import robust_moments, whiten

KAPPA = 6.0          # robust z of the class separation statistic that marks a class as poisoned
PROBE_EPS = 0.05     # the robust whitening may drop up to 2 * PROBE_EPS of a class
MAD_TO_SD = 1.4826   # median absolute deviation -> standard deviation for Gaussian data
WHITENED_RANKS = (4, 8, 16)  # a small class can only whiten a few dims reliably; a large one needs more
MAX_POISON_SIDE = 0.6  # largest share of a class the poison side of a split may hold
MIN_RELATIVE_SPREAD = 0.1  # floor of that spread, as a fraction of the median separation


@dataclass
class Split:
    """The best two-means split of one class along one direction."""

    direction: str            # "principal" or "whitened"
    separation: float         # D
    projection: torch.Tensor  # (n,) values along the direction
    high: torch.Tensor        # (n,) bool, the side above the cut


def split_1d(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(high-side mask, separation D) of the optimal two-means cut of 1-D values (exact, one sort)."""
    sorted_values, order = values.double().sort()
    n = len(values)
    total, total_sq = sorted_values.cumsum(0), (sorted_values ** 2).cumsum(0)
    left = torch.arange(1, n, dtype=torch.float64, device=values.device)
    left_mean = total[:-1] / left
    right_mean = (total[-1] - total[:-1]) / (n - left)
    within = (total_sq[-1] - left * left_mean ** 2 - (n - left) * right_mean ** 2)
    cut = int(within.argmin()) + 1  # left side = first `cut` sorted values
    low, high_values = sorted_values[:cut], sorted_values[cut:]
    pooled = ((low.var(correction=0) + high_values.var(correction=0)) / 2).sqrt().clamp_min(1e-12)
    separation = float((high_values.mean() - low.mean()) / pooled)
    high = torch.zeros(n, dtype=torch.bool, device=values.device)
    high[order[cut:]] = True
    return high, separation


def best_split(coords: torch.Tensor, generator: torch.Generator, probe_eps: float = PROBE_EPS) -> Split:
    """The best separated of the principal, robust-whitened and two-means directions."""
    principal = coords[:, 0]
    high, separation = split_1d(principal)
    best = Split("principal", separation, principal, high)
    assignment, centres = two_means(coords[:, :CLUSTER_DIMS], generator)
    between = coords[:, :CLUSTER_DIMS] @ (centres[1] - centres[0])
    high, separation = split_1d(between)
    if separation > best.separation:
        best = Split("clusters", separation, between, high)
    for rank in sorted({r for r in WHITENED_RANKS if r < coords.shape[1]} | {coords.shape[1]}):
        projection = whitened_projection(coords[:, :rank], probe_eps)
        high, separation = split_1d(projection)
        if separation > best.separation:
            best = Split(f"whitened{rank}", separation, projection, high)
    return best


def whitened_projection(coords: torch.Tensor, probe_eps: float) -> torch.Tensor:
    """Projection on the top eigenvector of the robustly whitened covariance, heavy tail up."""
    mean, cov, _ = robust_moments(coords, int(2 * probe_eps * len(coords)))
    whitened = whiten(coords, mean, cov)
    top = torch.linalg.eigh(whitened.T @ whitened).eigenvectors[:, -1]
    projection = whitened @ top
    return -projection if (projection ** 3).sum() < 0 else projection


def poison_side(split: Split, nearest_other: torch.Tensor) -> torch.Tensor:
    """Mask of the side whose members lie nearer (in input space) to the other classes."""
    high, low = split.high, ~split.high
    if not high.any() or not low.any():
        return high
    return high if nearest_other[high].mean() <= nearest_other[low].mean() else low


def oriented_scores(split: Split, poison: torch.Tensor) -> torch.Tensor:
    """Projection pointing toward the poison side, in robust standard deviations of the clean side."""
    # toward the poisons: a side of the split, or the transplant test's group, lies higher or lower on average
    if poison.any() and (~poison).any():
        toward_high = bool(split.projection[poison].mean() >= split.projection[~poison].mean())
    else:
        toward_high = split.high.equal(poison)
    values = split.projection if toward_high else -split.projection
    clean = values[~poison] if (~poison).any() else values
    centre = clean.median()
    spread = (clean - centre).abs().median().clamp_min(1e-12) * MAD_TO_SD
    return (values - centre) / spread


@dataclass
class InputDistances:
    """Each sample's input-space distance to its own class's centroid and to the nearest other class's."""

    own: torch.Tensor                  # (N,)
    nearest_other: torch.Tensor        # (N,)
    nearest_other_class: torch.Tensor  # (N,) int64, that class


def input_distances(inputs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> InputDistances:
    """Each of `inputs` (N, P)'s distance to its class's centroid and to the nearest other class's."""
    present = torch.bincount(labels, minlength=num_classes) > 0
    centroids = torch.stack([inputs[labels == c].mean(0) if present[c] else torch.zeros_like(inputs[0])
                             for c in range(num_classes)])
    return centroid_distances(inputs, labels, centroids, present)


def centroid_distances(inputs: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                       present: torch.Tensor) -> InputDistances:
    """Each input (B, P)'s distance to its class's centroid among `centroids` (C, P) and to the nearest one
    that is not its class's and whose class is `present` (C,) bool (inf when there is none). Works batch by
    batch (streaming.py)."""
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix product instead of cdist's pairwise loop
    squared = (inputs ** 2).sum(1, keepdim=True) - 2 * inputs @ centroids.T + (centroids ** 2).sum(1)
    distance = squared.clamp_min(0).sqrt()
    rows = torch.arange(len(labels), device=labels.device)
    own = distance[rows, labels].clone()
    distance[:, ~present] = float("inf")
    distance[rows, labels] = float("inf")
    nearest = distance.min(1)
    return InputDistances(own, nearest.values, nearest.indices)


def separation_scale(separations: torch.Tensor) -> tuple[float, float]:
    """(centre, spread) of the classes' separations: their median and robust standard deviation."""
    centre = separations.median()
    # with few classes the MAD can be near zero by chance; D is scale-free, so floor it relatively
    spread = torch.maximum((separations - centre).abs().median() * MAD_TO_SD, MIN_RELATIVE_SPREAD * centre)
    return float(centre), float(spread)
