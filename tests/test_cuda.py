"""CUDA code paths: each compute step takes its device from its inputs, keeps its outputs there, and agrees
with the CPU within a stated tolerance; the same seed gives the same weights.

Marked `cuda`: they run where torch.cuda.is_available() and are skipped elsewhere (tests/conftest.py).
Seeded synthetic data only (no download), so a bare GPU machine runs them. Tolerances, with TF32 off
(the fixture below; cuDNN convolutions use TF32 by default, ~1e-3 relative): fp32 weights after a few SGD steps
within atol 1e-4 / rtol 1e-3 of the CPU's; images from a few normalised-gradient steps within 1e-3; accuracies
within a few images. Where the randomness differs (a CUDA generator draws other numbers than a CPU one with
the same seed) outcomes are compared, not values.

To check the tests' own logic without a GPU: ROBUSTDATA_CUDA_TEST_DEVICE=cpu pytest --noconftest tests/test_cuda.py
(the "device" is then the CPU, compared with itself).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from contextlib import contextmanager

# cuBLAS is reproducible only with a fixed workspace, set before its first call (torch's randomness notes)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from robustdata.audit.features import extract_features  # noqa: E402
from robustdata.audit.scoring import METHODS, run_audit  # noqa: E402
from robustdata.config import AdversarialParams, AttackParams, TrainParams  # noqa: E402
from robustdata.data.memory import InMemoryDataset  # noqa: E402
from robustdata.robustify.builders import StepConfig, build_batch, input_gradients  # noqa: E402
from robustdata.train.attacks import L2, Linf, PGDConfig, fgsm_rs, pgd_attack  # noqa: E402
from robustdata.train.training import (evaluate_model, fit, generator_for, load_checkpoint, predict,  # noqa: E402
                                       save_checkpoint, seeded_model, train_model)

pytestmark = pytest.mark.cuda
DEVICE = torch.device(os.environ.get("ROBUSTDATA_CUDA_TEST_DEVICE", "cuda"))
CPU = torch.device("cpu")
FP32 = TrainParams(epochs=1, batch_size=64, lr=0.05, label_smoothing=0.0, weight_decay=0.0, precision="fp32",
                   channels_last=False)


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: these tests call the library only."""


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == DEVICE.type


def synthetic(n: int, seed: int = 0) -> InMemoryDataset:
    """28x28 grey images of 10 classes: a fixed random stroke template per class plus noise (learnable fast)."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, 1, 28, 28, generator=g) > 0.75).float()
    labels = torch.arange(n) % 10
    noisy = 0.6 * templates[labels] + 0.5 * torch.rand(n, 1, 28, 28, generator=g)
    images = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    return InMemoryDataset(images, labels, [f"s{i:05d}" for i in range(n)], [str(c) for c in range(10)])


def floats(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0)


@pytest.fixture(scope="module")
def data() -> InMemoryDataset:
    return synthetic(1280)


@pytest.fixture(scope="module")
def trained(data) -> torch.nn.Module:
    """A small CNN trained on the CPU for one epoch, in eval mode."""
    model = seeded_model("small_cnn", 10, 1, 28, init_seed=0)
    train_model(model, data, FP32, torch.Generator().manual_seed(0), progress=False)
    return model.eval()


@contextmanager
def deterministic():
    """torch's deterministic settings; yields the warnings of ops that have no deterministic kernel."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nondeterministic: list[str] = []
            yield nondeterministic
            nondeterministic.extend(str(w.message) for w in caught if "deterministic" in str(w.message))
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


# ------------------------------------------------------------------------------------------------ training


def test_a_training_step_runs_on_the_models_device_and_matches_the_cpu(data):
    """Same init, same data order (one CPU generator drives both), fp32: the weights after 8 SGD steps agree."""
    few = InMemoryDataset(data.images[:512], data.labels[:512], data.keys[:512], data.classes)
    models, histories = {}, {}
    for device in (CPU, DEVICE):
        models[device] = seeded_model("small_cnn", 10, 1, 28, init_seed=0, device=device)
        histories[device] = train_model(models[device], few, FP32, torch.Generator().manual_seed(0), progress=False)
    assert all(on_device(p) for p in models[DEVICE].parameters())
    for (name, on_cpu), on_gpu in zip(models[CPU].state_dict().items(), models[DEVICE].state_dict().values()):
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-4, msg=name)
    assert math.isclose(histories[DEVICE][0]["loss"], histories[CPU][0]["loss"], rel_tol=1e-4)


def test_bf16_training_on_the_device_learns(data):
    """The pipeline's default precision: bf16 autocast on the device's type (tensor cores on a GPU)."""
    model = seeded_model("small_cnn", 10, 1, 28, init_seed=0, device=DEVICE)
    params = FP32.model_copy(update={"precision": "bf16", "channels_last": True, "epochs": 2})
    history = train_model(model, data, params, generator_for(0, DEVICE), progress=False)
    assert all(math.isfinite(h["loss"]) for h in history) and history[1]["loss"] < history[0]["loss"]
    assert (predict(model, data.images) == data.labels).float().mean() > 0.9


def test_same_seed_training_on_the_device_gives_the_same_weights(data):
    """Bit-identical under torch's deterministic settings, unless an op warned that it has no deterministic
    kernel: then within the CPU-comparison tolerance, and the warning is shown."""
    weights, warned = [], []
    for _ in range(2):
        with deterministic() as nondeterministic:
            model = seeded_model("small_cnn", 10, 1, 28, init_seed=0, device=DEVICE)
            params = FP32.model_copy(update={"precision": "bf16", "channels_last": True})
            train_model(model, data, params, generator_for(0, DEVICE), progress=False)
        weights.append({k: v.cpu() for k, v in model.state_dict().items()})
        warned += nondeterministic
    for name in weights[0]:
        if warned:
            torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-3, atol=1e-4, msg=name)
        else:
            assert torch.equal(weights[1][name], weights[0][name]), name
    if warned:
        warnings.warn(f"not bit-identical by torch's promise: {sorted(set(warned))}")


def test_fit_adversarial_training_and_a_checkpoint_on_the_requested_device(data, tmp_path):
    """fit() with device set: PGD adversarial training with its overfitting guard, then a checkpoint that loads
    back onto the device and predicts the same."""
    train = InMemoryDataset(data.images[:640], data.labels[:640], data.keys[:640], data.classes)
    val = InMemoryDataset(data.images[640:], data.labels[640:], data.keys[640:], data.classes)
    params = FP32.model_copy(update={"device": str(DEVICE), "adversarial": AdversarialParams(
        method="pgd", eps=0.1, steps=3, step_size=0.05, guard_size=64)})
    model, info = fit(train, val, params, progress=False)
    assert all(on_device(p) for p in model.parameters()) and torch.device(info["device"]).type == DEVICE.type
    assert len(info["history"]) == 1 and 0 <= info["history"][0]["val_pgd10_accuracy"] <= 1
    save_checkpoint(tmp_path / "m.pt", model, {"arch": "small_cnn", "num_classes": 10, "in_channels": 1,
                                                 "image_size": 28})
    loaded, _ = load_checkpoint(tmp_path / "m.pt", device=DEVICE)
    assert all(on_device(p) for p in loaded.parameters())
    assert torch.equal(predict(loaded, val.images), predict(model, val.images))


# ------------------------------------------------------------------------------------------------- attacks


def test_pgd_on_the_device_matches_the_cpu_and_restores_the_model(trained, data):
    """A deterministic L2 PGD (no random start) gives the CPU's images; the model's mode is restored."""
    x, y = floats(data.images[:128]), data.labels[:128]
    attack = PGDConfig(L2(1.5), steps=5, step_size=0.5, random_start=False)
    on_cpu = pgd_attack(trained, x, y, attack)
    model = copy.deepcopy(trained).to(DEVICE).train()
    on_gpu = pgd_attack(model, x.to(DEVICE), y.to(DEVICE), attack)
    assert on_device(on_gpu) and model.training
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-3)


def test_random_start_attacks_draw_from_a_device_generator_and_stay_in_the_ball(trained, data):
    model = copy.deepcopy(trained).to(DEVICE)
    x, y = floats(data.images[:128]).to(DEVICE), data.labels[:128].to(DEVICE)
    generator = generator_for(0, DEVICE)
    pgd = pgd_attack(model, x, y, PGDConfig(Linf(0.2), steps=5, step_size=0.05, restarts=2), generator=generator)
    fgsm = fgsm_rs(model, x, y, 0.2, 0.25, generator)
    for x_adv in (pgd, fgsm):
        assert on_device(x_adv) and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= 0.2 + 1e-6
    clean = (predict(model, x) == y.cpu()).float().mean()
    assert (predict(model, pgd) == y.cpu()).float().mean() <= clean


# --------------------------------------------------------------------------------------------------- audit


def planted_features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, 32), inputs (N, 16), labels, is_poison): 4 classes of 400; 10% of class 1 is a shifted
    cluster whose inputs lie near other classes' centroids plus a trigger (what the audit looks for)."""
    g = torch.Generator().manual_seed(seed)
    classes, per_class, dim, input_dim = 4, 400, 32, 16
    labels = torch.arange(classes).repeat_interleave(per_class)
    means = 3 * torch.randn(classes, dim, generator=g)
    features = means[labels] + torch.randn(len(labels), dim, generator=g)
    centroids = 3 * torch.randn(classes, input_dim, generator=g)
    inputs = centroids[labels] + 0.5 * torch.randn(len(labels), input_dim, generator=g)
    poisons = torch.nonzero(labels == 1).flatten()[:40]
    direction = torch.randn(dim, generator=g)
    features[poisons] = means[1] + 10 * direction / direction.norm() + 0.3 * torch.randn(40, dim, generator=g)
    inputs[poisons] = centroids[(torch.arange(40) % 3).masked_fill(torch.arange(40) % 3 == 1, 3)] + 1.0
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    is_poison[poisons] = True
    return features, inputs, labels, is_poison


def test_the_audit_runs_on_the_features_device_and_flags_what_the_cpu_flags():
    features, inputs, labels, is_poison = planted_features()
    results = {}
    for device in (CPU, DEVICE):
        results[device] = run_audit(features.to(device), inputs.to(device), labels.to(device), 4, eps=None,
                                    methods=METHODS, generator=generator_for(0, device))
    on_gpu, on_cpu = results[DEVICE], results[CPU]
    assert all(on_device(on_gpu.scores[m]) and on_device(on_gpu.flagged[m]) for m in METHODS)
    assert [c["poisoned"] for c in on_gpu.classes] == [c["poisoned"] for c in on_cpu.classes] == [False, True, False,
                                                                                                    False]
    for result in (on_gpu, on_cpu):
        removed = result.removed.cpu()
        assert (removed & is_poison).sum() >= 38 and (removed & ~is_poison).sum() <= 4
    gpu_removed, cpu_removed = on_gpu.removed.cpu(), on_cpu.removed.cpu()
    assert (gpu_removed & cpu_removed).sum() / (gpu_removed | cpu_removed).sum() >= 0.95


def test_features_come_back_on_the_models_device_and_match_the_cpu(trained, data):
    model = copy.deepcopy(trained).to(DEVICE)
    for layer in ("penultimate", "last_conv"):
        on_gpu = extract_features(model, data.images[:256], layer, batch_size=100)
        assert on_device(on_gpu)
        torch.testing.assert_close(on_gpu.cpu(), extract_features(trained, data.images[:256], layer, batch_size=100),
                                   rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------- builds


@pytest.mark.parametrize("kind, config", [
    ("robust", StepConfig(10, 0.5, "linear", precision="fp32", relu_grad_beta=4.0, pool_grad="avg")),
    ("det", StepConfig(10, 0.3, eps=2.0, precision="fp32")),
])
def test_builds_run_on_the_models_device_and_match_the_cpu(trained, data, kind, config):
    """With one CPU generator both builds start from the same images; the built images agree within 1e-3."""
    index = torch.arange(64)
    model = copy.deepcopy(trained).to(DEVICE)
    on_cpu = build_batch(kind, trained, index, data.images, data.labels, 10, "penultimate", config,
                         torch.Generator().manual_seed(0))
    on_gpu = build_batch(kind, model, index, data.images, data.labels, 10, "penultimate", config,
                         torch.Generator().manual_seed(0))
    assert on_device(on_gpu.images) and on_device(on_gpu.labels)
    assert torch.equal(on_gpu.labels.cpu(), on_cpu.labels)
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images, rtol=0, atol=1e-3)
    measure = "final_distance" if kind == "robust" else "final_loss"
    torch.testing.assert_close(getattr(on_gpu, measure).cpu(), getattr(on_cpu, measure), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["robust", "nonrobust", "rand", "det"])
def test_bf16_builds_with_a_device_generator(trained, data, kind):
    """The pipeline's build recipe on the device: bf16 steps, the generator on the device too."""
    model = copy.deepcopy(trained).to(DEVICE)
    eps = None if kind == "robust" else 2.0
    config = StepConfig(5, 0.5, "linear", eps=math.inf if eps is None else eps, precision="bf16",
                        relu_grad_beta=4.0 if kind == "robust" else None, pool_grad="avg")
    built = build_batch(kind, model, torch.arange(64), data.images, data.labels, 10, "penultimate", config,
                        generator_for(0, DEVICE))
    assert on_device(built.images) and built.images.dtype == torch.float32
    assert built.images.min() >= 0 and built.images.max() <= 1 and torch.isfinite(built.images).all()
    if kind in ("robust", "nonrobust"):
        assert torch.equal(built.labels.cpu(), data.labels[:64])
        assert ((built.start_index >= 0) & (built.start_index < len(data)) & (built.start_index.cpu() != torch.arange(64))).all()
    else:
        assert (built.labels.cpu() != data.labels[:64]).all()


def test_input_gradients_stay_on_the_device(trained, data):
    model = copy.deepcopy(trained).to(DEVICE)
    x, y = floats(data.images[:8]), data.labels[:8]
    grad = input_gradients(model, x.to(DEVICE), y.to(DEVICE))
    assert on_device(grad)
    torch.testing.assert_close(grad.cpu(), input_gradients(trained, x, y), rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_on_the_device_matches_the_cpu(trained, data):
    """Clean accuracy to within one image; robust accuracy (random starts differ by device) within 4 of 128."""
    test = InMemoryDataset(data.images[:512], data.labels[:512], data.keys[:512], data.classes)
    attack = AttackParams(threat="linf", eps=0.1, steps=5, step_size=0.03, restarts=1)
    reports = {device: evaluate_model(copy.deepcopy(trained).to(device), test, [attack], limit=128, seed=0)
               for device in (CPU, DEVICE)}
    gpu, cpu = reports[DEVICE], reports[CPU]
    assert abs(gpu["clean"]["accuracy"] - cpu["clean"]["accuracy"]) <= 1 / 512
    assert abs(gpu["robust"][0]["accuracy"] - cpu["robust"][0]["accuracy"]) <= 4 / 128
    for report in (gpu, cpu):
        assert report["robust"][0]["accuracy"] <= report["robust"][0]["clean_accuracy_same_images"]
