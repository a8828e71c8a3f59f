"""SPECTRE (Hayase, Kong, Somani, Oh 2021; robustdata/audit/spectre.py): robust whitening + QUantum Entropy.

It scores after the verdict: its robust covariance drops up to 2 eps of the
class, with eps the given bound or the filter's estimate of the class's
poisoned fraction (0.05 for a class judged clean). It reads up to `rank`
principal coordinates per sample, kept from pass 1, so the streaming audit runs
it only when asked. Flags: the class's budget by score.
"""

from __future__ import annotations

import torch

from robustdata.audit.methods import register
from robustdata.audit.methods.base import (AuditOptions, ClassFlags, ClassScores, ClassVerdict, Method,
                                           top_k_mask)
from robustdata.audit.spectre import spectre_scores

CLEAN_CLASS_EPS = 0.05  # the robust estimate's eps in a class whose estimated poisoned fraction is 0


@register
class Spectre(Method):
    name = "spectre"
    order = 20
    keeps_coordinates = True
    streams_by_default = False  # N * rank coordinates (64) instead of N * filter_rank (16)

    def coordinates(self, options: AuditOptions) -> int:
        return options.rank

    def rescore(self, verdict: ClassVerdict, options: AuditOptions, generator: torch.Generator) -> ClassScores:
        eps = verdict.fraction if verdict.fraction > 0 else CLEAN_CLASS_EPS
        scores, info = spectre_scores(verdict.coords, eps)
        return ClassScores(scores, info={"spectre_rank": info["rank"]})

    def flag(self, verdict: ClassVerdict, scores: torch.Tensor, options: AuditOptions,
             generator: torch.Generator) -> ClassFlags:
        return ClassFlags(top_k_mask(scores, verdict.budget))
