"""SIG: the sinusoid's pixel values are written out by hand on tiny images; training poisons carry `delta`, the
test-time trigger `test_delta`; only target-class images are poisoned and every label is kept."""

from __future__ import annotations

import pytest
import torch

import robustdata.poison
from poison_helpers import gen, images, prefect_server  # noqa: F401  (the fixture)
from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.plant import Dose, plant, triggered_test_set
from robustdata.poison.sig import SIG
from robustdata.poison.targeting import Targeting


def flat(value: int, width: int, height: int = 3, channels: int = 2) -> torch.Tensor:
    return torch.full((1, channels, height, width), value, dtype=torch.uint8)


def every_row(row: list[int], height: int = 3, channels: int = 2) -> torch.Tensor:
    return torch.tensor(row, dtype=torch.uint8).expand(1, channels, height, len(row))


# ---------------------------------------------------------------- registry and options

def test_found_by_name_as_a_clean_label_attack_with_the_paper_defaults():
    assert "sig" in attack_names()
    attack = backdoor("sig")
    assert isinstance(attack, SIG)
    assert (attack.delta, attack.test_delta, attack.frequency) == (20, 40, 6)
    assert attack.clean_label and attack.cover_ratio == 0
    assert backdoor("sig", {"test_delta": 60, "frequency": 4}).id == "sig-test_delta=60-frequency=4"


@pytest.mark.parametrize("options, message", [
    ({"delta": 0}, "sig delta 0 is outside [1, 255]"),
    ({"delta": 256}, "sig delta 256 is outside [1, 255]"),
    ({"test_delta": 0.5}, "sig test_delta 0.5 is outside [1, 255]"),
    ({"test_delta": float("nan")}, "sig test_delta nan is outside [1, 255]"),
    ({"frequency": 0}, "sig frequency 0 must be positive (periods across the width)"),
    ({"frequency": -2}, "sig frequency -2 must be positive (periods across the width)"),
    ({"f": 6}, "unknown option(s) ['f'] of the sig attack; valid: ['delta', 'test_delta', 'frequency']"),
])
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(RobustDataError) as error:
        robustdata.poison.backdoor("sig", options)
    assert message in str(error.value)


def test_a_frequency_the_width_cannot_carry_is_refused():
    # f = 6 on a 12-pixel row is sin(pi j) = 0 at every pixel: no signal at all
    for step in ("apply", "poison"):
        with pytest.raises(RobustDataError, match="sig frequency 6 needs an image wider than 12 pixels, got width 12"):
            getattr(backdoor("sig"), step)(images(2, (1, 8, 12)), gen())


def test_refuses_float_images():
    with pytest.raises(RobustDataError, match="uint8"):
        backdoor("sig").apply(images().float(), gen())


# ---------------------------------------------------------------- known answers

def test_one_period_over_four_columns():
    # 20 sin(2 pi j / 4), j = 0..3: 0, 20, 0, -20, on every row and channel
    poison = backdoor("sig", {"delta": 20, "frequency": 1}).poison(flat(100, 4), gen())
    assert torch.equal(poison, every_row([100, 120, 100, 80]))


def test_two_periods_over_twelve_columns_train_and_test_strengths():
    # sin(2 pi j 2 / 12) = sin(60 j degrees): 0, .866, .866, 0, -.866, -.866, repeated
    attack = backdoor("sig", {"delta": 20, "test_delta": 30, "frequency": 2})
    # training poison: 20 * .866 = 17.3 -> 17
    assert torch.equal(attack.poison(flat(100, 12), gen()),
                       every_row([100, 117, 117, 100, 83, 83, 100, 117, 117, 100, 83, 83]))
    # test-time trigger: 30 * .866 = 26.0 -> 26
    assert torch.equal(attack.apply(flat(100, 12), gen()),
                       every_row([100, 126, 126, 100, 74, 74, 100, 126, 126, 100, 74, 74]))


def test_a_fractional_frequency():
    # sin(2 pi j 1.5 / 8) = sin(67.5 j degrees): 0, .924, .707, -.383, -1, -.383, .707, .924; times 20
    poison = backdoor("sig", {"delta": 20, "frequency": 1.5}).poison(flat(100, 8), gen())
    assert torch.equal(poison, every_row([100, 118, 114, 92, 80, 92, 114, 118]))


def test_clips_at_0_and_255():
    attack = backdoor("sig", {"delta": 20, "frequency": 1})
    assert torch.equal(attack.poison(flat(250, 4), gen()), every_row([250, 255, 250, 230]))
    assert torch.equal(attack.poison(flat(5, 4), gen()), every_row([5, 25, 5, 0]))


def test_the_change_depends_on_the_column_only_and_not_on_the_generator():
    x = images(5, (3, 32, 32), low=60, high=190)
    attack = backdoor("sig")
    change = attack.apply(x, gen(0)).int() - x.int()
    assert (change == change[:1, :1, :1, :]).all()   # same on every image, channel and row
    assert change.abs().max() > 35                   # test_delta 40, not delta 20
    assert torch.equal(attack.apply(x, gen(0)), attack.apply(x, gen(99)))
    poison_change = attack.poison(x, gen(0)).int() - x.int()
    assert (poison_change == poison_change[:1, :1, :1, :]).all() and 15 < poison_change.abs().max() <= 20


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_keeps_dtype_shape_and_device_and_leaves_the_input_alone(device, shape):
    before = images(5, shape).to(device)
    copy = before.clone()
    for step in ("apply", "poison"):
        after = getattr(backdoor("sig"), step)(before, gen())
        assert torch.equal(before, copy)
        assert after.dtype == torch.uint8 and after.shape == before.shape and after.device == before.device
        assert not torch.equal(after, before)
        assert torch.equal(after.cpu(), getattr(backdoor("sig"), step)(copy.cpu(), gen()))


# ---------------------------------------------------------------- planting

def test_plant_poisons_only_the_target_class_and_keeps_every_label():
    labels = torch.arange(4).repeat(10)  # 40 images, 10 per class
    x = images(40, (1, 16, 16), low=60, high=196, seed=1)
    attack = backdoor("sig", {"delta": 20, "test_delta": 50, "frequency": 2})
    planted = plant(x, labels, attack, Targeting("all_to_one", (1,)), Dose(rate=0.5), 4, gen(2))
    poisoned = planted.is_poison
    assert int(poisoned.sum()) == 5                  # the rate is of the target class's 10 images
    assert (labels[poisoned] == 1).all()
    assert torch.equal(planted.labels, labels)       # clean-label: nothing relabelled
    assert not planted.is_cover.any()
    assert torch.equal(planted.images[~poisoned], x[~poisoned])
    change = planted.images[poisoned].int() - x[poisoned].int()
    # 16 columns, f = 2: sin(45 j degrees) * 20 -> 0, 14, 20, 14, 0, -14, -20, -14, twice
    row = torch.tensor([0, 14, 20, 14, 0, -14, -20, -14] * 2, dtype=torch.int32)
    assert torch.equal(change, row.expand_as(change))


def test_the_triggered_test_set_carries_the_test_strength_on_the_other_classes():
    labels = torch.arange(4).repeat(3)
    x = images(12, (1, 16, 16), low=60, high=196, seed=3)
    attack = backdoor("sig", {"delta": 20, "test_delta": 50, "frequency": 2})
    triggered, targets, true = triggered_test_set(x, labels, attack, Targeting("all_to_one", (1,)), 4, gen())
    assert (true != 1).all() and len(true) == 9 and (targets == 1).all()
    change = triggered.int() - x[labels != 1].int()
    # 50 * sin(45 j degrees): 0, 35.4, 50, 35.4, 0, ...
    row = torch.tensor([0, 35, 50, 35, 0, -35, -50, -35] * 2, dtype=torch.int32)
    assert torch.equal(change, row.expand_as(change))


def test_all_to_all_is_refused_for_a_clean_label_attack():
    with pytest.raises(RobustDataError, match="sig is a clean-label attack"):
        plant(images(8, (1, 16, 16)), torch.arange(4).repeat(2), backdoor("sig"), Targeting("all_to_all", ()),
              Dose(rate=0.5), 4, gen())
