"""IBM ART's spectral-signature and activation-clustering defences, run as references next to the project's audit.

ART (adversarial-robustness-toolbox) is in the dev extra; only benchmarks use it. From a script in benchmarks/:
`from art_reference import art_spectral_signatures, art_activation_clustering`.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn


def _layer_pinned_classifier(model: nn.Module, layer: str, **kwargs):
    """A PyTorchClassifier whose only "layer name" is `layer` (any dotted name from named_modules()).

    Why: SpectralSignatureDefense.detect_poison always reads
    `classifier.get_activations(x, layer=len(classifier.layer_names) - 1)`, and PyTorchClassifier's
    layer_names are only the model's top-level children, so by default ART reads the last top-level
    module (the logits of a plain model) and has no parameter to choose another. With layer_names
    == [layer], that index is 0 and ART's own get_activations resolves it through
    `named_modules()[layer]` and a forward hook on that module: ART's real extraction and scoring,
    reading the module output flattened to (N, D), as robustdata.train.models.representation does.
    """
    from art.estimators.classification import PyTorchClassifier

    class LayerPinnedClassifier(PyTorchClassifier):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self._layer_names = [layer]  # read by layer_names and by get_activations

    return LayerPinnedClassifier(model, **kwargs)


def _art_inputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                layer_module_name: str):
    """(classifier, layer, x, y): ART's view of the model pinned to one layer, and the data as ART takes it.

    The classifier wraps an fp32 eval-mode copy (ART moves its model to its device, switches it to eval
    and leaves a forward hook on it, none of which should leak into a model trained with bf16 autocast /
    channels_last). x: float32 NCHW in [0, 1]; y: integer labels (ART's segment_by_class takes indices
    as well as one-hot rows)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) uint8; got {tuple(images.shape)} {images.dtype}")
    layer = getattr(model, "LAYERS", {}).get(layer_module_name, layer_module_name)
    model.get_submodule(layer)  # fail here, with torch's message, on a name the model does not have

    ref = copy.deepcopy(getattr(model, "_orig_mod", model)).float().eval()  # _orig_mod: torch.compile'd
    classifier = _layer_pinned_classifier(
        ref, layer, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
        nb_classes=num_classes, clip_values=(0.0, 1.0),
        device_type="gpu" if torch.cuda.is_available() else "cpu")
    x = images.cpu().numpy().astype(np.float32) / 255.0
    y = labels.cpu().numpy().astype(np.int64)
    return classifier, layer, x, y


def art_spectral_signatures(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                            num_classes: int, expected_poison_fraction: float, layer_module_name: str,
                            batch_size: int = 1000) -> dict:
    """Run IBM ART's SpectralSignatureDefense on `model` over `images` and integer `labels`.

    `model` is a trained torch classifier; `images` an (N, C, H, W) uint8 tensor, pixel/255 being
    the model input in [0, 1]. `layer_module_name` is a module name from `model.named_modules()`
    (or an alias from the model's LAYERS, e.g. "penultimate" -> "fc1" for SmallCNN).

    ART's budget: in EVERY class c (not only a target class) ART flags the samples whose score is
    >= the (1 - eps_multiplier * expected_pp_poison) quantile of that class's scores, i.e. about
    1.5 * expected_poison_fraction * n_c samples per class, poisoned or not (all of them once
    eps * p >= 1). Its score quirk: the top singular vector v comes from the class's CENTRED
    activations, but the score is |<v, x>| on the UNCENTRED x (Tran et al. use |<v, x - mean>|),
    i.e. |<v, mean> + <v, x - mean>|: when the class mean has a large component along v, ART ranks
    by the tail on the mean's side only, and poisons on the other side score LOW (on the tiny
    planted test at the logits layer ART catches 0 of 20 poisons where the centred score gets 20).

    Returns {"flagged": bool (N,) True = ART says poison, "seconds_total": wall time of ART's
    detect_poison (its own activation extraction included), "layer": the module ART read,
    "art_version": str, "settings": {...}}. The caller's model is not touched: ART runs on an fp32
    eval-mode copy (ART moves its model to its device, switches it to eval and leaves a forward hook
    on it, none of which should leak into a model trained with bf16 autocast / channels_last).
    """
    import art
    from art.defences.detector.poison import SpectralSignatureDefense

    classifier, layer, x, y = _art_inputs(model, images, labels, num_classes, layer_module_name)
    defence = SpectralSignatureDefense(classifier, x, y, expected_pp_poison=expected_poison_fraction,
                                       batch_size=batch_size, eps_multiplier=1.5)
    start = time.perf_counter()
    report, is_clean_lst = defence.detect_poison()
    seconds = time.perf_counter() - start

    # ART's convention: is_clean_lst[i] == 1 clean, 0 poison; the report's keys are the flagged indices.
    flagged = np.asarray(is_clean_lst) == 0
    if set(np.flatnonzero(flagged).tolist()) != {int(i) for i in report}:
        raise RuntimeError("ART's is_clean_lst and report disagree: has its flag convention changed?")
    return {
        "flagged": flagged,
        "seconds_total": seconds,
        "layer": layer,
        "art_version": art.__version__,
        "settings": {
            "defence": "art.defences.detector.poison.SpectralSignatureDefense",
            "expected_pp_poison": expected_poison_fraction,
            "eps_multiplier": 1.5,
            "flag_fraction_per_class": min(1.5 * expected_poison_fraction, 1.0),
            "batch_size": batch_size,
            "device": str(classifier.device),
            "dtype": "float32",
            "input": "uint8/255, NCHW",
            "score": "ART: |<v, x>|, v top right-singular vector of centred class activations, x uncentred",
        },
    }


# ART's ActivationDefence defaults (art/defences/detector/poison/activation_defence.py, 1.20.1): 2 clusters,
# 10 PCA dimensions, the smaller cluster of every class is the poison. Chen et al. 2018 ("Detecting
# Backdoor Attacks on Deep Neural Networks by Activation Clustering", arXiv:1811.03728) reduce with ICA;
# ART's class default is PCA (its module-level helpers default to FastICA): we run what the class runs.
ART_CLUSTERING = {"nb_clusters": 2, "nb_dims": 10, "reduce": "PCA", "cluster_analysis": "smaller"}


def art_activation_clustering(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                              num_classes: int, layer_module_name: str, seed: int = 0) -> dict:
    """Run IBM ART's ActivationDefence (activation clustering) with its defaults on `model`.

    Same inputs as art_spectral_signatures, without eps: activation clustering needs no budget. Per class,
    ART reduces the layer's activations to 10 dimensions (PCA), splits them with 2-means and flags the
    smaller cluster, in every class, poisoned or not (so about a third to a half of a clean class is
    flagged). sklearn's KMeans and PCA are built by ART without a random_state, so they draw from numpy's
    global generator: it is seeded with `seed` for the call and restored after, which makes the flags
    repeatable (the benchmark caches retraining by the flags).

    Returns {"flagged": bool (N,) True = ART says poison, "seconds_total": wall time of detect_poison (its
    own activation pass included), "layer", "art_version", "smaller_cluster_fraction": per class, the
    flagged share as ART reports it, "settings"}. The caller's model is not touched (see _art_inputs).
    """
    import art
    from art.defences.detector.poison import ActivationDefence

    classifier, layer, x, y = _art_inputs(model, images, labels, num_classes, layer_module_name)
    defence = ActivationDefence(classifier, x, y)
    saved_state = np.random.get_state()
    np.random.seed(seed)
    try:
        start = time.perf_counter()
        report, is_clean_lst = defence.detect_poison(**ART_CLUSTERING)
        seconds = time.perf_counter() - start
    finally:
        np.random.set_state(saved_state)

    flagged = np.asarray(is_clean_lst) == 0  # ART: is_clean_lst[i] == 1 clean, 0 poison
    per_class = np.bincount(y[flagged], minlength=num_classes)
    sizes = np.bincount(y, minlength=num_classes)
    if (2 * per_class > sizes).any():  # "smaller" flags at most half of a class
        raise RuntimeError("ART flagged more than half of a class with cluster_analysis='smaller': "
                           "has its is_clean_lst convention changed?")
    return {
        "flagged": flagged,
        "seconds_total": seconds,
        "layer": layer,
        "art_version": art.__version__,
        "smaller_cluster_fraction": [float(n / max(total, 1)) for n, total in zip(per_class, sizes)],
        "suspicious_clusters": int(report.get("suspicious_clusters", 0)),
        "settings": {"defence": "art.defences.detector.poison.ActivationDefence", **ART_CLUSTERING,
                     "clustering_method": "KMeans", "numpy_seed": seed, "device": str(classifier.device),
                     "dtype": "float32", "input": "uint8/255, NCHW"},
    }
