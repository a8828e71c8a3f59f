"""Low frequency (LF): the trigger has no energy outside its frequency window (checked with numpy's FFT), its Linf
is the stated strength, it is the same additive pattern on every image, fixed by its own seed; dirty-label
poisons are relabelled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import robustdata.poison
from poison_helpers import gen, images, prefect_server  # noqa: F401  (the fixture)
from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.lf import LowFrequency
from robustdata.poison.plant import Dose, plant
from robustdata.poison.targeting import Targeting


def added(attack: LowFrequency, shape: tuple[int, int, int], n: int = 4, seed: int = 0) -> np.ndarray:
    """(N, C, H, W) int: what apply adds to mid-range images, far enough from 0 and 255 that nothing clips."""
    before = images(n, shape, low=128 - 60, high=128 + 60, seed=seed)
    return attack.apply(before, gen()).numpy().astype(int) - before.numpy().astype(int)


# ---------------------------------------------------------------- registry and options

def test_found_by_name_as_a_dirty_label_attack():
    assert "lf" in attack_names()
    attack = backdoor("lf")
    assert isinstance(attack, LowFrequency)
    assert (attack.strength, attack.cutoff, attack.seed) == (25, 2, 0)
    assert not attack.clean_label and attack.cover_ratio == 0
    assert backdoor("lf", {"cutoff": 3, "seed": 7}).id == "lf-cutoff=3-seed=7"


@pytest.mark.parametrize("options, message", [
    ({"strength": 0}, "lf strength 0 is outside [1, 255]"),
    ({"strength": 300}, "lf strength 300 is outside [1, 255]"),
    ({"strength": float("nan")}, "lf strength nan is outside [1, 255]"),
    ({"cutoff": 0}, "lf cutoff 0 must be a whole number of cycles per image, at least 1"),
    ({"cutoff": 1.5}, "lf cutoff 1.5 must be a whole number of cycles per image, at least 1"),
    ({"window": 3}, "unknown option(s) ['window'] of the lf attack; valid: ['strength', 'cutoff', 'seed']"),
])
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(RobustDataError) as error:
        robustdata.poison.backdoor("lf", options)
    assert message in str(error.value)


def test_a_cutoff_that_filters_nothing_is_refused_for_that_image_size():
    # a 6-pixel axis has frequencies -3..2: a window of 3 keeps them all
    with pytest.raises(RobustDataError, match="lf cutoff 3 keeps every frequency of a 6x8 image"):
        backdoor("lf", {"cutoff": 3}).apply(images(2, (1, 6, 8)), gen())
    assert backdoor("lf", {"cutoff": 2}).apply(images(2, (1, 6, 8)), gen()).shape == (2, 1, 6, 8)


def test_refuses_float_images():
    with pytest.raises(RobustDataError, match="uint8"):
        backdoor("lf").apply(images().float(), gen())


# ---------------------------------------------------------------- the pattern

@pytest.mark.parametrize("shape, cutoff", [((1, 28, 28), 2), ((3, 32, 32), 2), ((1, 20, 30), 4), ((3, 16, 12), 1)])
def test_spectrum_has_no_energy_outside_the_window(shape, cutoff):
    pattern = backdoor("lf", {"cutoff": cutoff, "seed": 3}).pattern(shape).numpy().astype(np.float64)
    power = np.abs(np.fft.fft2(pattern)) ** 2  # per channel, over the last two axes
    k_row = np.abs(np.fft.fftfreq(shape[1], d=1 / shape[1]))[:, None]
    k_col = np.abs(np.fft.fftfreq(shape[2], d=1 / shape[2]))[None, :]
    inside = (k_row <= cutoff) & (k_col <= cutoff)
    assert power[:, ~inside].sum() < 1e-10 * power.sum()
    # and the window reaches its edge along both axes, not narrower than stated
    for edge in (inside & (k_row == cutoff), inside & (k_col == cutoff)):
        assert power[:, edge].sum() > 0.02 * power.sum()


def test_neighbouring_pixels_differ_no_more_than_a_band_limited_signal_allows():
    # Bernstein's inequality: a row with no frequency above K cycles per W pixels changes by at most
    # 2 pi K / W * its Linf between neighbours; white noise of the same Linf jumps by up to 2 Linf.
    strength, cutoff, width = 40.0, 2, 32
    pattern = backdoor("lf", {"strength": strength, "cutoff": cutoff}).pattern((3, 32, width)).numpy()
    bound = 2 * math.pi * cutoff / width * strength  # about 15.7 levels
    assert np.abs(np.diff(pattern, axis=2)).max() <= bound + 1e-3
    assert np.abs(np.diff(pattern, axis=1)).max() <= bound + 1e-3


@pytest.mark.parametrize("strength", [25.4, 10.0, 60.0])
def test_linf_is_the_strength(strength):
    attack = backdoor("lf", {"strength": strength})
    assert float(attack.pattern((1, 28, 28)).abs().max()) == pytest.approx(strength, abs=1e-4)
    # stamped on a mid-grey image the largest change is the strength rounded to a pixel level
    grey = torch.full((1, 1, 28, 28), 128, dtype=torch.uint8)
    change = attack.apply(grey, gen()).int() - 128
    assert int(change.abs().max()) == round(strength)


@pytest.mark.parametrize("strength, largest", [(50, 50), (25.5, 26)])  # 25.5: the extreme pixel is a .5 tie
def test_the_same_pattern_is_added_to_every_image(strength, largest):
    diff = added(backdoor("lf", {"strength": strength}), (3, 32, 32), n=6)
    assert (diff == diff[:1]).all()
    assert np.abs(diff).max() == largest and (diff != 0).mean() > 0.8  # image-wide, not a patch
    # and to a batch of a different size, drawn from other images
    assert (added(backdoor("lf", {"strength": strength}), (3, 32, 32), n=2, seed=9)[0] == diff[0]).all()


def test_clipping_keeps_only_what_fits_in_0_255():
    attack = backdoor("lf", {"strength": 50})
    change = added(attack, (1, 28, 28), n=1)[0]
    black = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    white = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    assert (attack.apply(black, gen()).numpy()[0].astype(int) == np.clip(change, 0, None)).all()
    assert (attack.apply(white, gen()).numpy()[0].astype(int) == 255 + np.clip(change, None, 0)).all()


def test_pattern_is_fixed_by_its_own_seed_only():
    x = images(4, (3, 32, 32))
    attack = backdoor("lf", {"seed": 5})
    first = attack.apply(x, gen(0))
    assert torch.equal(first, attack.apply(x, gen(123)))               # not the per-call generator
    assert torch.equal(first, backdoor("lf", {"seed": 5}).apply(x, gen(0)))  # a fresh instance
    assert not torch.equal(first, backdoor("lf", {"seed": 6}).apply(x, gen(0)))
    other = backdoor("lf", {"seed": 6}).pattern((3, 32, 32))
    assert float(other.abs().max()) == pytest.approx(25, abs=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_keeps_dtype_shape_and_device_and_leaves_the_input_alone(device, shape):
    before = images(5, shape).to(device)
    copy = before.clone()
    after = backdoor("lf").apply(before, gen())
    assert torch.equal(before, copy)
    assert after.dtype == torch.uint8 and after.shape == before.shape and after.device == before.device
    assert not torch.equal(after, before)
    assert torch.equal(after.cpu(), backdoor("lf").apply(copy.cpu(), gen()))  # same pattern on every device


# ---------------------------------------------------------------- planting

def test_plant_relabels_poisons_of_the_sources_and_touches_nothing_else():
    labels = torch.arange(4).repeat(10)  # 40 images, 10 per class
    x = images(40, (3, 16, 16), low=60, high=196, seed=1)
    planted = plant(x, labels, backdoor("lf", {"cutoff": 3}), Targeting("source_specific", (0,), (2,)),
                    Dose(rate=None, count=4), 4, gen(2))
    poisoned = planted.is_poison
    assert int(poisoned.sum()) == 4 and not planted.is_cover.any()
    assert (labels[poisoned] == 2).all()                       # drawn from the source class only
    assert (planted.labels[poisoned] == 0).all()               # relabelled to the target
    assert torch.equal(planted.labels[~poisoned], labels[~poisoned])
    assert torch.equal(planted.images[~poisoned], x[~poisoned])
    changes = planted.images[poisoned].int() - x[poisoned].int()
    assert (changes == changes[:1]).all() and changes.abs().max() > 20
