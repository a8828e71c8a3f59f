"""Activation clustering (Chen et al. 2018; robustdata/audit/clustering.py), the baseline.

Score: how much closer a sample lies to the smaller of two k-means clusters of
the top 10 principal coordinates. Flags by its own rule, whatever the budget:
the smaller cluster when it holds less than 35% of the class.
"""

from __future__ import annotations

import torch

from robustdata.audit.clustering import DIMS, activation_clustering
from robustdata.audit.methods import register
from robustdata.audit.methods.base import AuditOptions, ClassScores, ClassView, Method


@register
class Clustering(Method):
    name = "clustering"
    order = 40

    def coordinates(self, options: AuditOptions) -> int:
        return DIMS

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores:
        scores, flags, _ = activation_clustering(view.pca.coords.float(), generator)
        return ClassScores(scores.double(), flags)
