"""Label-consistent backdoor: the four-corner trigger at full amplitude (apply) and reduced amplitude (poison),
the adversarial perturbation within its budget, the surrogate given, loaded or trained, clean-label planting.

The trigger's pixels are written out by hand from the authors' code (MadryLab/label-consistent-backdoor-code,
poison_attack.py, "all-corners"), so a wrong corner, mirror or sign fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.label_consistent import LabelConsistent, perturb, surrogate_arch
from robustdata.poison.plant import Dose, plant, triggered_test_set
from robustdata.poison.targeting import Targeting


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison modules never import prefect."""


# An 8 x 10 image: + bright cell, - dark cell, . untouched. Left corners "+--/-+-/+-+", right ones mirrored.
TRIGGER_8X10 = ["+--....--+",
                "-+-....-+-",
                "+-+....+-+",
                "..........",
                "..........",
                "+--....--+",
                "-+-....-+-",
                "+-+....+-+"]


def cells(kind: str) -> torch.Tensor:
    """(8, 10) bool: where TRIGGER_8X10 has `kind`."""
    return torch.tensor([[char == kind for char in row] for row in TRIGGER_8X10])


def images(n: int = 4, channels: int = 3, height: int = 8, width: int = 10, low: int = 1, high: int = 255,
           seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, channels, height, width), generator=generator, dtype=torch.uint8)


def linear_model(channels: int = 3, height: int = 8, width: int = 10, classes: int = 4, seed: int = 0) -> nn.Module:
    """A tiny classifier: PGD against it is instant, and its loss rises along the gradient's sign."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, classes)).eval()


def attack(**options) -> LabelConsistent:
    options.setdefault("model", linear_model())
    return backdoor("label_consistent", options)


GEN = torch.Generator().manual_seed(0)


def test_found_by_name_and_clean_label():
    assert "label_consistent" in attack_names()
    assert type(backdoor("label_consistent")) is LabelConsistent
    assert LabelConsistent.clean_label and LabelConsistent.cover_ratio == 0


# ---------------------------------------------------------------- the trigger

def test_apply_stamps_the_four_corners_at_full_amplitude_and_nothing_else():
    before = images()  # values 1..254: every trigger cell changes
    after = attack().apply(before, GEN)
    assert (after[:, :, cells("+")] == 255).all()
    assert (after[:, :, cells("-")] == 0).all()
    untouched = cells(".")
    assert torch.equal(after[:, :, untouched], before[:, :, untouched])


def test_poison_adds_the_trigger_at_reduced_amplitude_clipped():
    flat = torch.full((2, 1, 8, 10), 100, dtype=torch.uint8)
    flat[1] = 230
    poisoned = attack(eps=0, amplitude=64, model=linear_model(channels=1)).poison(flat, GEN)  # eps 0: trigger only
    assert (poisoned[0, 0][cells("+")] == 164).all() and (poisoned[0, 0][cells("-")] == 36).all()
    assert (poisoned[1, 0][cells("+")] == 255).all() and (poisoned[1, 0][cells("-")] == 166).all()  # 294 clips
    assert torch.equal(poisoned[:, 0][:, cells(".")], flat[:, 0][:, cells(".")])


def test_trigger_is_fixed_whatever_the_seed_generator_or_images():
    x = images(n=3)
    first = attack(seed=0).apply(x, torch.Generator().manual_seed(1))
    assert torch.equal(first, attack(seed=7).apply(x, torch.Generator().manual_seed(2)))
    other = attack().apply(images(n=3, seed=5), GEN)
    assert torch.equal(first[:, :, ~cells(".")], other[:, :, ~cells(".")])


def test_trigger_refuses_images_smaller_than_two_corners():
    with pytest.raises(RobustDataError, match="at least 6x6"):
        attack().apply(images(height=5, width=10), GEN)


# ---------------------------------------------------------------- the perturbation

@pytest.mark.parametrize("norm, eps", [("linf", 8), ("linf", 12.7), ("l2", 20), ("l2", 7.5)])
def test_perturbation_stays_within_its_budget_and_uses_it(norm, eps):
    x = images(n=6, low=0, high=256)
    adversarial = perturb(linear_model(), x, norm, eps, steps=10, step_size=2.5 * eps / 10)
    delta = adversarial.float() - x.float()
    if norm == "linf":
        assert delta.abs().max() <= eps
        assert delta.abs().max() >= eps - 1  # a linear model's gradient sign is fixed: PGD goes to the edge
    else:
        norms = delta.flatten(1).norm(dim=1)
        assert (norms <= eps).all()
        assert (norms > 0.8 * eps).all()  # rounding to whole levels keeps most of the budget


def test_perturbation_raises_the_surrogate_loss_on_its_own_predictions():
    model, x = linear_model(), images(n=8, low=30, high=220)
    adversarial = perturb(model, x, "linf", 16, steps=10, step_size=4)
    with torch.no_grad():
        predicted = model(x.float() / 255).argmax(1)
        clean_loss = F.cross_entropy(model(x.float() / 255), predicted, reduction="none")
        adversarial_loss = F.cross_entropy(model(adversarial.float() / 255), predicted, reduction="none")
    assert (adversarial_loss > clean_loss).all()


def test_poison_is_the_perturbed_image_with_the_faint_trigger():
    x = images(n=5, low=60, high=196)  # far from 0 and 255: neither the perturbation nor the trigger clips
    poisoned = attack(eps=8, amplitude=32).poison(x, GEN)
    delta = poisoned.int() - x.int()
    plain = cells(".")
    assert delta[:, :, plain].abs().max() <= 8 and delta[:, :, plain].abs().max() >= 7
    assert (delta[:, :, cells("+")] >= 24).all() and (delta[:, :, cells("+")] <= 40).all()
    assert (delta[:, :, cells("-")] >= -40).all() and (delta[:, :, cells("-")] <= -24).all()


def test_poison_is_deterministic_and_ignores_the_generator():
    x, lc = images(n=4), attack(eps=8)
    first = lc.poison(x, torch.Generator().manual_seed(0))
    assert torch.equal(first, lc.poison(x, torch.Generator().manual_seed(99)))


@pytest.mark.parametrize("method", ["apply", "poison"])
def test_keeps_dtype_shape_device_and_leaves_the_input_alone(method):
    x = images(n=3)
    copy = x.clone()
    out = getattr(attack(eps=8), method)(x, GEN)
    assert torch.equal(x, copy)
    assert out.dtype == torch.uint8 and out.shape == x.shape and out.device == x.device
    assert out.data_ptr() != x.data_ptr()
    empty = getattr(attack(eps=8), method)(x[:0], GEN)
    assert empty.shape == (0, 3, 8, 10)


def test_poison_without_a_surrogate_says_to_prepare():
    with pytest.raises(RobustDataError, match="call prepare"):
        backdoor("label_consistent").poison(images(), GEN)


# ---------------------------------------------------------------- the surrogate

def test_default_surrogate_architecture_fits_mnist_and_cifar_shapes():
    assert surrogate_arch("auto", (1, 28, 28)) == "small_cnn"
    assert surrogate_arch("auto", (3, 32, 32)) == "resnet18"
    assert surrogate_arch("small_cnn", (3, 20, 20)) == "small_cnn"


def test_prepare_keeps_a_given_model():
    lc = attack()
    assert lc.prepare(images(), torch.zeros(4, dtype=torch.long), GEN) is lc


def test_prepare_trains_a_seeded_surrogate_that_id_and_equality_ignore():
    x, y = images(n=64, channels=1, height=12, width=12, low=0, high=256), torch.arange(4).repeat(16)
    bare = backdoor("label_consistent", {"arch": "small_cnn", "surrogate_epochs": 1})  # small_cnn sized to 12x12
    ready = bare.prepare(x, y, GEN)
    assert isinstance(ready.model, nn.Module) and bare.model is None
    assert ready == bare and ready.id == bare.id == "label_consistent-arch=small_cnn-surrogate_epochs=1"
    assert "model" not in repr(ready)
    again = bare.prepare(x, y, GEN).model.state_dict()
    other = dataclasses.replace(bare, seed=1).prepare(x, y, GEN).model.state_dict()
    weights = ready.model.state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not all(torch.equal(weights[k], other[k]) for k in weights)
    assert ready.poison(x[:3], GEN).shape == (3, 1, 12, 12)


def test_prepare_loads_a_surrogate_directory(tmp_path):
    from robustdata.train.models import build_model
    from robustdata.train.training import MODEL_FILE, save_checkpoint

    model = build_model("small_cnn", 3, 1, 12)
    save_checkpoint(tmp_path / MODEL_FILE, model,
                    {"arch": "small_cnn", "num_classes": 3, "in_channels": 1, "image_size": 12})
    lc = backdoor("label_consistent", {"surrogate": str(tmp_path)})
    x = images(n=3, channels=1, height=12, width=12)
    ready = lc.prepare(x, torch.zeros(3, dtype=torch.long), GEN)
    loaded = ready.model.state_dict()
    assert all(torch.equal(value, loaded[k]) for k, value in model.state_dict().items())
    with pytest.raises(RobustDataError, match="takes 1-channel 12-pixel images; the data has 1-channel 16-pixel"):
        lc.prepare(images(n=3, channels=1, height=16, width=16), torch.zeros(3, dtype=torch.long), GEN)


@pytest.mark.parametrize("options, shape, message", [
    ({}, (1, 10, 10), "no default surrogate for 1x10x10"),
    ({"arch": "small_cnn"}, (1, 12, 16), "square images"),
])
def test_prepare_without_a_fitting_architecture_asks_for_a_surrogate(options, shape, message):
    x = images(n=4, channels=shape[0], height=shape[1], width=shape[2])
    with pytest.raises(RobustDataError, match=message):
        backdoor("label_consistent", options).prepare(x, torch.zeros(4, dtype=torch.long), GEN)


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("options, message", [
    ({"norm": "l1"}, "unknown label_consistent norm 'l1'; valid: \\['linf', 'l2'\\]"),
    ({"eps": -1}, "eps -1 is outside"),
    ({"eps": 300}, "eps 300 is outside \\[0, 255\\]"),
    ({"steps": 0}, "steps 0 must be at least 1"),
    ({"step_size": 0}, "step_size 0 must be > 0"),
    ({"amplitude": 0}, "amplitude 0 is outside \\[1, 255\\]"),
    ({"amplitude": 256}, "amplitude 256 is outside"),
    ({"surrogate_epochs": 0}, "surrogate_epochs 0 must be at least 1"),
    ({"model": "resnet"}, "must be a torch nn.Module"),
    ({"colour": "red"}, "unknown option\\(s\\) \\['colour'\\].*valid: .*amplitude"),
])
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(RobustDataError, match=message):
        backdoor("label_consistent", options)


def test_l2_budget_may_exceed_255():
    assert backdoor("label_consistent", {"norm": "l2", "eps": 300}).eps == 300  # the paper's L2 300


# ---------------------------------------------------------------- planting

def test_plant_poisons_only_target_images_and_keeps_every_label():
    classes, per_class = 4, 10
    labels = torch.arange(classes).repeat(per_class)
    x = images(n=len(labels), low=60, high=196, seed=3)
    planted = plant(x, labels, attack(eps=8), Targeting("all_to_one", (2,)), Dose(rate=0.5), classes,
                    torch.Generator().manual_seed(0))
    assert int(planted.is_poison.sum()) == 5  # half of class 2's ten images
    assert (labels[planted.is_poison] == 2).all()
    assert torch.equal(planted.labels, labels)
    assert not planted.is_cover.any()
    poisons = planted.is_poison
    assert torch.equal(planted.images[~poisons], x[~poisons])
    assert (planted.images[poisons][:, :, cells("+")].int() - x[poisons][:, :, cells("+")].int() >= 24).all()
    triggered, targets, true = triggered_test_set(x, labels, planted.attack, Targeting("all_to_one", (2,)),
                                                  classes, GEN)
    assert (targets == 2).all() and (true != 2).all() and (triggered[:, :, cells("+")] == 255).all()
