"""Representations the audit reads, extracted in one inference pass."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from robustdata.train.attacks import evaluating
from robustdata.train.models import representation


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, layer: str, *, batch_size: int = 1000,
                     progress: bool = False) -> torch.Tensor:
    """(N, D) float32 activations of `layer` for uint8 images (N, C, H, W), on the model's device.

    Runs in fp32 so the scores do not depend on the autocast precision used in training.
    """
    device = next(model.parameters()).device
    chunks = []
    with evaluating(model):
        for start in tqdm(range(0, len(images), batch_size), desc=f"features {layer}", unit="batch",
                          disable=not progress, leave=False):
            batch = images[start:start + batch_size].to(device).float().div_(255.0)
            chunks.append(representation(model, batch, layer).float())
    return torch.cat(chunks)
