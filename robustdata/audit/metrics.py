"""Detection metrics against ground truth (poisons planted by robustdata.poison).

AUROC is the Mann-Whitney statistic with ties counted half; AUPRC is average
precision (the step-wise area, as sklearn's average_precision_score). Both are a
few lines over one sort, so they run on the device that holds the scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustdata.data.memory import InMemoryDataset
from robustdata.train.training import predict


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """P(score of a random positive > score of a random negative); None without both kinds."""
    num_pos = int(positive.sum())
    num_neg = len(positive) - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    ranks = average_ranks(scores.double())
    rank_sum = ranks[positive].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their mean rank."""
    order = values.argsort()
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def auprc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Average precision: mean over positives of the precision at their score threshold."""
    num_pos = int(positive.sum())
    if num_pos == 0:
        return None
    order = scores.double().argsort(descending=True, stable=True)
    sorted_scores, hits = scores.double()[order], positive[order].double()
    # a threshold takes every sample tied at its score, so evaluate at the last index of each tie run
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    tp = hits.cumsum(0)[last_of_run]
    predicted = torch.nonzero(last_of_run).flatten().double() + 1
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / num_pos
    return float((recall_gain * tp / predicted).sum())


def confusion(flagged: torch.Tensor, positive: torch.Tensor) -> dict[str, Any]:
    tp = int((flagged & positive).sum())
    fp = int((flagged & ~positive).sum())
    fn = int((~flagged & positive).sum())
    tn = int((~flagged & ~positive).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "tpr": tp / (tp + fn) if tp + fn else None,
            "fpr": fp / (fp + tn) if fp + tn else None,
            "precision": tp / (tp + fp) if tp + fp else None}


def recall_at_budget(scores: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor,
                     budgets: dict[int, int]) -> float | None:
    """Recall when each class c removes its `budgets[c]` highest-scoring samples."""
    num_pos = int(positive.sum())
    if num_pos == 0:
        return None
    caught = 0
    for label, budget in budgets.items():
        members = torch.nonzero(labels == label).flatten()
        top = members[scores[members].argsort(descending=True)[:budget]]
        caught += int(positive[top].sum())
    return caught / num_pos


def detection_metrics(scores: torch.Tensor, flagged: torch.Tensor, positive: torch.Tensor,
                      labels: torch.Tensor, num_classes: int,
                      budgets: dict[int, int] | None = None) -> dict[str, Any]:
    """Overall and per-class confusion counts, rates, AUROC and AUPRC of one method."""
    scores, flagged, positive, labels = (t.cpu() for t in (scores, flagged, positive.bool(), labels))
    overall = {**confusion(flagged, positive), "auroc": auroc(scores, positive),
               "auprc": auprc(scores, positive),
               "recall_at_budget": recall_at_budget(scores, positive, labels, budgets) if budgets else None}
    per_class = []
    for label in range(num_classes):
        mask = labels == label
        per_class.append({"label": label, **confusion(flagged[mask], positive[mask]),
                          "auroc": auroc(scores[mask], positive[mask]),
                          "auprc": auprc(scores[mask], positive[mask])})
    return {"overall": overall, "per_class": per_class}


def clean_accuracy(model: nn.Module, test: InMemoryDataset) -> float:
    """Fraction of `test` classified as labelled."""
    return float((predict(model, test.images).cpu() == test.labels).float().mean())


def attack_success_rate(model: nn.Module, triggered: InMemoryDataset) -> float:
    """Fraction of triggered test images (true class != target, labelled with the target) classified as the
    target: the clean accuracy on the triggered set."""
    return clean_accuracy(model, triggered)
