"""Representations the audit reads, extracted in one inference pass."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustdata.train.attacks import evaluating
from robustdata.train.models import representation
from robustdata.progress import progress_bar


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, layer: str, *, batch_size: int = 1000,
                     progress: bool = False) -> torch.Tensor:
    """(N, D) float32 activations of `layer` for uint8 images (N, C, H, W), on the model's device.

    Runs in fp32 so the scores do not depend on the autocast precision used in training.
    """
    device = next(model.parameters()).device
    chunks = []
    with evaluating(model):
        for start in progress_bar(range(0, len(images), batch_size), desc=f"features {layer}", unit="batch",
                                  disable=not progress, leave=False):
            batch = images[start:start + batch_size].to(device).float().div_(255.0)
            chunks.append(representation(model, batch, layer).float())
    return torch.cat(chunks)


def feature_chunks(num_samples: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of whole extraction batches, one per worker (each chunk loads the model and the
    dataset, so more chunks would repeat that I/O). Chunks cut at batch boundaries run exactly the batches
    of the single pass, so the features come out bit for bit the same."""
    batches_per_chunk = max(1, math.ceil(math.ceil(num_samples / batch_size) / workers))
    step = batches_per_chunk * batch_size
    return [(start, min(start + step, num_samples)) for start in range(0, num_samples, step)]
