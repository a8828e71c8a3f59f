"""The eps-free iterative filter (robustdata/audit/filtering.py; Diakonikolas et al.'s robust-mean filter).

Score: each sample's projection on the class's best split direction, pointing
toward the poison side, in robust standard deviations of the clean side.
Flags without eps: the poison side of every class judged poisoned. With eps it
removes the class's budget in this order: its poison side (by score), then the
clean side's outliers toward the poisons (score above SUSPICIOUS_Z), then a
seeded uniform draw from the rest of the class, not the next scores (why:
robustdata/audit/scoring.py's module docstring).
"""

from __future__ import annotations

import torch

from robustdata.audit.filtering import oriented_scores
from robustdata.audit.methods import register
from robustdata.audit.methods.base import (AuditOptions, ClassFlags, ClassScores, ClassVerdict, ClassView, Method,
                                           top_k_mask)

SUSPICIOUS_Z = 3.0  # filter score (robust sd from the clean side's median) beyond which a clean-side sample is ranked


@register
class Filter(Method):
    name = "filter"
    order = 10

    def coordinates(self, options: AuditOptions) -> int:
        return options.filter_rank

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores:
        return ClassScores(oriented_scores(view.split, view.side))

    def flag(self, verdict: ClassVerdict, scores: torch.Tensor, options: AuditOptions,
             generator: torch.Generator) -> ClassFlags:
        suspects = verdict.side if verdict.poisoned else torch.zeros_like(verdict.side)
        if options.eps is None:
            return ClassFlags(suspects)
        flags, drawn = filter_budget_mask(scores, suspects, verdict.budget, generator)
        return ClassFlags(flags, {"filled_at_random": drawn})


def filter_budget_mask(scores: torch.Tensor, poison_side: torch.Tensor, budget: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """(removed mask, how many were drawn at random) for one class: the poison side and the clean
    side's outliers by score, the rest of the budget uniformly from the typical samples (module docstring)."""
    ranked = poison_side | (scores > SUSPICIOUS_Z)
    # typical samples get priorities in (-2, -1), below every ranked one (scores there exceed SUSPICIOUS_Z > 0)
    typical = torch.rand(len(scores), generator=generator, device=generator.device).to(scores) - 2.0
    priority = torch.where(ranked, scores.clamp_min(0.0), typical)
    removed = top_k_mask(priority, budget)
    return removed, int((removed & ~ranked).sum())
