"""Backdoor poisons: triggers touch exactly their pixels, attacks pick exactly their images.

Expected patch locations are written out by hand for a 10 x 12 image, so a
wrong corner or margin convention fails here rather than passing by
recomputing the library's own arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustdata.errors import RobustDataError
from robustdata.audit.poisoners import Attack, Trigger, apply_trigger, choose_poisons, poison, triggered_test_set

HEIGHT, WIDTH, CHANNELS = 10, 12, 3
NUM_CLASSES = 4


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison module never imports prefect."""


def images(n: int = 5, seed: int = 0, high: int = 255) -> torch.Tensor:
    """Random uint8 images whose pixels are all < `high`, so a stamp of 255 changes every pixel it touches."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, CHANNELS, HEIGHT, WIDTH), generator=generator, dtype=torch.uint8)


def balanced_labels(per_class: int = 50) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat(per_class)  # 0, 1, 2, 3, 0, 1, ...


def changed_pixels(before: torch.Tensor, after: torch.Tensor) -> set[tuple[int, int]]:
    """(row, col) of every pixel that changed in any image or channel."""
    rows, cols = torch.nonzero((before != after).any(0).any(0), as_tuple=True)
    return set(zip(rows.tolist(), cols.tolist()))


def box(row: int, col: int, size: int) -> set[tuple[int, int]]:
    return {(r, c) for r in range(row, row + size) for c in range(col, col + size)}


# ---------------------------------------------------------------- triggers

@pytest.mark.parametrize("position, margin, origin", [
    # 10 x 12 image, 3 x 3 patch: far row = 10 - 3 - margin, far col = 12 - 3 - margin
    ("top_left", 1, (1, 1)),
    ("top_right", 1, (1, 8)),
    ("bottom_left", 1, (6, 1)),
    ("bottom_right", 1, (6, 8)),
    ("bottom_right", 0, (7, 9)),
    ("top_left", 0, (0, 0)),
    ("bottom_left", 2, (5, 2)),
    ("2,5", 1, (2, 5)),
    ("7,9", 0, (7, 9)),  # the last position a 3 x 3 patch fits
    ("0,0", 3, (0, 0)),  # margin only applies to corner names
])
def test_square_changes_exactly_its_patch(position, margin, origin):
    before = images()
    after = apply_trigger(before, Trigger("square", size=3, value=255, position=position, margin=margin))
    assert changed_pixels(before, after) == box(*origin, 3)
    row, col = origin
    assert (after[:, :, row:row + 3, col:col + 3] == 255).all()


@pytest.mark.parametrize("position, margin, pixel", [
    ("bottom_right", 1, (8, 10)),
    ("top_left", 0, (0, 0)),
    ("top_right", 2, (2, 9)),
    ("4,6", 1, (4, 6)),
])
def test_pixel_changes_exactly_one_pixel(position, margin, pixel):
    before = images()
    after = apply_trigger(before, Trigger("pixel", size=3, value=255, position=position, margin=margin))
    assert changed_pixels(before, after) == {pixel}  # `size` is ignored for a pixel trigger
    assert (after[:, :, pixel[0], pixel[1]] == 255).all()


def test_pattern_is_a_checkerboard_of_value_and_zero():
    before = images(high=255)
    before[before == 0] = 1  # no pixel already 0 or 200, so every checker cell shows as a change
    before[before == 200] = 201
    after = apply_trigger(before, Trigger("pattern", size=3, value=200, position="top_left", margin=1))
    expected_patch = torch.tensor([[200, 0, 200],
                                   [0, 200, 0],
                                   [200, 0, 200]], dtype=torch.uint8)
    assert torch.equal(after[:, :, 1:4, 1:4], expected_patch.expand(len(before), CHANNELS, 3, 3))
    assert changed_pixels(before, after) == box(1, 1, 3)


def test_square_value_is_written_as_given():
    before = images()
    after = apply_trigger(before, Trigger("square", size=2, value=7, position="0,0"))
    assert (after[:, :, :2, :2] == 7).all()
    assert torch.equal(after[:, :, 2:, :], before[:, :, 2:, :])
    assert torch.equal(after[:, :, :, 2:], before[:, :, :, 2:])


def test_blend_is_the_alpha_mix_with_the_seeded_pattern():
    before = images(n=4, high=256)
    alpha, seed = 0.3, 11
    after = apply_trigger(before, Trigger("blend", alpha=alpha, pattern_seed=seed))
    pattern = torch.randint(0, 256, (CHANNELS, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(seed))
    expected = np.clip(np.round((1 - alpha) * before.numpy().astype(np.float64) + alpha * pattern.numpy()), 0, 255)
    # float32 inside the library vs float64 here: allow a rounding step at exact .5 boundaries
    assert np.abs(after.numpy().astype(int) - expected.astype(int)).max() <= 1
    assert (after.numpy().astype(int) == expected.astype(int)).mean() > 0.99


def test_blend_alpha_one_replaces_the_image_with_the_pattern():
    trigger = Trigger("blend", alpha=1.0, pattern_seed=3)
    first, second = apply_trigger(images(seed=0), trigger), apply_trigger(images(seed=1), trigger)
    assert torch.equal(first, second)  # nothing of the input is left
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first, apply_trigger(images(seed=0), Trigger("blend", alpha=1.0, pattern_seed=4)))


def test_blend_pattern_is_fixed_by_its_seed():
    x = images(n=3, high=256)
    same = [apply_trigger(x, Trigger("blend", alpha=0.2, pattern_seed=5)) for _ in range(2)]
    assert torch.equal(*same)
    assert not torch.equal(same[0], apply_trigger(x, Trigger("blend", alpha=0.2, pattern_seed=6)))


@pytest.mark.parametrize("trigger", [
    Trigger("square"), Trigger("pixel"), Trigger("pattern"), Trigger("blend", alpha=0.9),
    Trigger("square", value=0, position="top_left"),
], ids=lambda t: t.id)
def test_trigger_keeps_input_dtype_shape_and_leaves_input_alone(trigger):
    before = images(n=6, high=256)
    copy = before.clone()
    after = apply_trigger(before, trigger)
    assert torch.equal(before, copy)
    assert after.dtype == torch.uint8 and after.shape == before.shape
    assert after.data_ptr() != before.data_ptr()
    assert not torch.equal(after, before)


def test_trigger_ids_differ_between_kinds():
    ids = {Trigger(kind).id for kind in ("square", "pixel", "pattern", "blend")}
    assert len(ids) == 4


# ------------------------------------------------------ invalid settings

@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "star"}, "unknown trigger kind 'star'"),
    ({"value": 256}, "outside 0..255"),
    ({"value": -1}, "outside 0..255"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"size": 0}, "at least 1 pixel"),
])
def test_invalid_trigger_settings_raise(kwargs, message):
    with pytest.raises(RobustDataError, match=message):
        Trigger(**kwargs)


def test_unknown_kind_error_lists_the_valid_kinds():
    with pytest.raises(RobustDataError, match="square") as info:
        Trigger(kind="star")
    assert all(kind in str(info.value) for kind in ("pixel", "pattern", "blend"))


@pytest.mark.parametrize("trigger, message", [
    (Trigger("square", size=11), "does not fit"),                     # taller than the 10-row image
    (Trigger("square", size=3, position="8,0"), "does not fit"),      # runs off the bottom
    (Trigger("square", size=3, position="0,10"), "does not fit"),     # runs off the right
    (Trigger("pixel", position="10,0"), "does not fit"),
    (Trigger("square", size=3, position="-1,0"), "does not fit"),
    (Trigger("square", size=9, margin=2), "does not fit"),           # fits only without the margin
    (Trigger("square", position="middle"), "bottom_right"),          # lists the valid corner names
    (Trigger("square", position="1;2"), "row,col"),
])
def test_patch_that_does_not_fit_raises(trigger, message):
    with pytest.raises(RobustDataError, match=message):
        apply_trigger(images(), trigger)


@pytest.mark.parametrize("bad", [images().float(), images()[0]])
def test_apply_trigger_wants_uint8_nchw(bad):
    with pytest.raises(RobustDataError, match="uint8"):
        apply_trigger(bad, Trigger())


@pytest.mark.parametrize("attack, message", [
    (Attack(Trigger(), rate=0.1, count=5), "exactly one of the poison rate and count"),
    (Attack(Trigger(), rate=None, count=None), "exactly one of the poison rate and count"),
    (Attack(Trigger(), rate=1.5), "rate 1.5"),
    (Attack(Trigger(), rate=-0.1), "rate -0.1"),
    (Attack(Trigger(), target=2, source=2), "source class must differ"),
    (Attack(Trigger(), target=1, source=7), "source class 7"),
    (Attack(Trigger(), target=-1), "target class -1"),
    (Attack(Trigger(), target=0, rate=None, count=151), "151 poisons asked but only 150"),   # all-to-one: 3 x 50
    (Attack(Trigger(), target=0, source=1, rate=None, count=51), "51 poisons asked but only 50"),
    (Attack(Trigger(), target=0, source=1, rate=0.3), "60 poisons asked but only 50"),      # rate of all 200
])
def test_invalid_attack_settings_raise(attack, message):
    with pytest.raises(RobustDataError, match=message):
        choose_poisons(balanced_labels(), attack, torch.Generator().manual_seed(0))


# ---------------------------------------------------------- choose_poisons

def test_all_to_one_never_picks_the_target():
    labels = balanced_labels()
    for target in range(NUM_CLASSES):
        index = choose_poisons(labels, Attack(Trigger(), target=target, rate=None, count=150),
                               torch.Generator().manual_seed(target))
        assert len(index) == 150  # every eligible image
        assert (labels[index] != target).all()
        assert set(labels[index].tolist()) == set(range(NUM_CLASSES)) - {target}


def test_source_to_target_picks_only_the_source():
    labels = balanced_labels()
    index = choose_poisons(labels, Attack(Trigger(), target=0, source=2, rate=None, count=30),
                           torch.Generator().manual_seed(1))
    assert len(index) == 30 and (labels[index] == 2).all()


@pytest.mark.parametrize("rate, count, expected", [
    (0.05, None, 10),    # 5% of all 200 images
    (0.1, None, 20),
    (0.0, None, 0),
    (None, 17, 17),
    (None, 0, 0),
    (None, 150, 150),
])
def test_rate_or_count_gives_the_exact_number(rate, count, expected):
    index = choose_poisons(balanced_labels(), Attack(Trigger(), target=3, rate=rate, count=count),
                           torch.Generator().manual_seed(0))
    assert len(index) == expected
    assert len(set(index.tolist())) == expected  # no image poisoned twice
    assert torch.equal(index, index.sort().values)


def test_same_seed_same_poisons_different_seed_different():
    labels, attack = balanced_labels(), Attack(Trigger(), target=1, rate=0.1)
    first = choose_poisons(labels, attack, torch.Generator().manual_seed(42))
    again = choose_poisons(labels, attack, torch.Generator().manual_seed(42))
    other = choose_poisons(labels, attack, torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_choices_cover_the_eligible_images_uniformly():
    """Over many seeds every eligible image is picked, about equally often (a drawn, not a fixed, subset)."""
    labels = balanced_labels(per_class=10)  # 30 eligible images, 6 poisons per draw
    counts = torch.zeros(len(labels))
    draws = 500
    for seed in range(draws):
        counts[choose_poisons(labels, Attack(Trigger(), target=0, rate=None, count=6),
                              torch.Generator().manual_seed(seed))] += 1
    assert (counts[labels == 0] == 0).all()
    frequency = counts[labels != 0] / draws
    assert (frequency - 6 / 30).abs().max() < 0.07  # binomial sd is 0.018 at 500 draws


# ------------------------------------------------------------------ poison

@pytest.mark.parametrize("attack", [
    Attack(Trigger("square"), target=2, rate=0.1),
    Attack(Trigger("pixel", position="top_left"), target=0, source=3, rate=None, count=12),
    Attack(Trigger("pattern", value=255), target=1, rate=0.2),
], ids=["square-all-to-one", "pixel-source", "pattern"])
def test_poison_marks_exactly_the_changed_rows(attack):
    labels = balanced_labels()
    x = images(n=len(labels), seed=3)
    x[x == 0] = 1  # no pixel is already 0 or 255, so every stamp (255 and 0 checker cells) changes its row
    before_x, before_y = x.clone(), labels.clone()
    out_x, out_y, is_poison = poison(x, labels, attack, torch.Generator().manual_seed(5))

    assert torch.equal(x, before_x) and torch.equal(labels, before_y)
    assert is_poison.dtype == torch.bool and len(is_poison) == len(labels)
    changed = (out_x != x).flatten(1).any(1)
    assert torch.equal(changed, is_poison)
    assert int(is_poison.sum()) == attack.num_poisons(len(labels))
    assert (out_y[is_poison] == attack.target).all()
    assert (attack.eligible(labels)[is_poison]).all()
    assert torch.equal(out_y[~is_poison], labels[~is_poison])
    assert torch.equal(out_x[~is_poison], x[~is_poison])
    assert torch.equal(out_x[is_poison], apply_trigger(x[is_poison], attack.trigger))
    # the same generator seed picks the same rows as choose_poisons
    expected = choose_poisons(labels, attack, torch.Generator().manual_seed(5))
    assert torch.equal(torch.nonzero(is_poison).flatten(), expected)


# ------------------------------------------------------ triggered test set

@pytest.mark.parametrize("attack, eligible_labels", [
    (Attack(Trigger("square"), target=2), {0, 1, 3}),
    (Attack(Trigger("blend", alpha=0.5), target=0, source=3), {3}),
], ids=["all-to-one", "source-to-target"])
def test_triggered_test_set_covers_every_eligible_image(attack, eligible_labels):
    labels = balanced_labels(per_class=7)
    x = images(n=len(labels), seed=9, high=256)
    before = x.clone()
    triggered, target_labels, true_labels = triggered_test_set(x, labels, attack)

    keep = torch.tensor([int(label) in eligible_labels for label in labels])
    assert len(triggered) == len(target_labels) == len(true_labels) == int(keep.sum()) == 7 * len(eligible_labels)
    assert (target_labels == attack.target).all()
    assert torch.equal(true_labels, labels[keep])
    assert torch.equal(triggered, apply_trigger(x[keep], attack.trigger))
    assert torch.equal(x, before)


def test_negative_poison_count_raises():
    with pytest.raises(RobustDataError, match="count"):
        choose_poisons(balanced_labels(), Attack(Trigger(), target=0, rate=None, count=-1),
                       torch.Generator().manual_seed(0))
