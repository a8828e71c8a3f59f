"""Spectral signatures (Tran, Li, Madry 2018; robustdata/audit/spectral.py).

Score: the centred squared projection on the class's top spectral_k principal
directions. Flags: the class's budget by score (1.5 eps n_c, or 1.5 times the
filter's estimate when eps is not given).
"""

from __future__ import annotations

import torch

from robustdata.audit.methods import register
from robustdata.audit.methods.base import (AuditOptions, ClassFlags, ClassScores, ClassVerdict, ClassView, Method,
                                           top_k_mask)
from robustdata.audit.spectral import spectral_signature_scores


@register
class Spectral(Method):
    name = "spectral"
    order = 30

    def coordinates(self, options: AuditOptions) -> int:
        return options.spectral_k

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores:
        return ClassScores(spectral_signature_scores(view.pca, options.spectral_k))

    def flag(self, verdict: ClassVerdict, scores: torch.Tensor, options: AuditOptions,
             generator: torch.Generator) -> ClassFlags:
        return ClassFlags(top_k_mask(scores, verdict.budget))
