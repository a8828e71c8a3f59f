"""Backdoor poisons: triggers touch exactly their pixels, targetings send exactly their classes, plant picks
exactly its images (robustdata.poison: the registry, base, targeting, plant, badnets, blended).

Expected patch locations are written out by hand for a 10 x 12 image, so a
wrong corner or margin convention fails here rather than passing by
recomputing the library's own arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.badnets import BadNets
from robustdata.poison.base import Backdoor
from robustdata.poison.plant import Dose, choose_poisons, plant, triggered_test_set
from robustdata.poison.targeting import Targeting

HEIGHT, WIDTH, CHANNELS = 10, 12, 3
NUM_CLASSES = 4
G = torch.Generator  # a fresh generator: the fixed-position triggers draw nothing from it


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison modules never import prefect."""


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


def stamp(x: torch.Tensor, name: str = "badnets", **options) -> torch.Tensor:
    return backdoor(name, options).apply(x, G())


ALL_TO_ONE = Targeting("all_to_one", (0,))


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
    after = stamp(before, shape="square", size=3, value=255, position=position, margin=margin)
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
    after = stamp(before, shape="pixel", size=3, value=255, position=position, margin=margin)
    assert changed_pixels(before, after) == {pixel}  # `size` is ignored for a pixel trigger
    assert (after[:, :, pixel[0], pixel[1]] == 255).all()


def test_checkerboard_is_a_checkerboard_of_value_and_zero():
    before = images(high=255)
    before[before == 0] = 1  # no pixel already 0 or 200, so every checker cell shows as a change
    before[before == 200] = 201
    after = stamp(before, shape="checkerboard", size=3, value=200, position="top_left", margin=1)
    expected_patch = torch.tensor([[200, 0, 200],
                                   [0, 200, 0],
                                   [200, 0, 200]], dtype=torch.uint8)
    assert torch.equal(after[:, :, 1:4, 1:4], expected_patch.expand(len(before), CHANNELS, 3, 3))
    assert changed_pixels(before, after) == box(1, 1, 3)


def test_square_value_is_written_as_given():
    before = images()
    after = stamp(before, size=2, value=7, position="0,0")
    assert (after[:, :, :2, :2] == 7).all()
    assert torch.equal(after[:, :, 2:, :], before[:, :, 2:, :])
    assert torch.equal(after[:, :, :, 2:], before[:, :, :, 2:])


def test_blend_is_the_alpha_mix_with_the_seeded_pattern():
    before = images(n=4, high=256)
    alpha, seed = 0.3, 11
    after = stamp(before, "blended", alpha=alpha, seed=seed)
    pattern = torch.randint(0, 256, (CHANNELS, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(seed))
    expected = np.clip(np.round((1 - alpha) * before.numpy().astype(np.float64) + alpha * pattern.numpy()), 0, 255)
    # float32 inside the library vs float64 here: allow a rounding step at exact .5 boundaries
    assert np.abs(after.numpy().astype(int) - expected.astype(int)).max() <= 1
    assert (after.numpy().astype(int) == expected.astype(int)).mean() > 0.99


def test_blend_alpha_one_replaces_the_image_with_the_pattern():
    first, second = (stamp(images(seed=seed), "blended", alpha=1.0, seed=3) for seed in (0, 1))
    assert torch.equal(first, second)  # nothing of the input is left
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first, stamp(images(seed=0), "blended", alpha=1.0, seed=4))


def test_blend_pattern_is_fixed_by_its_seed():
    x = images(n=3, high=256)
    same = [stamp(x, "blended", alpha=0.2, seed=5) for _ in range(2)]
    assert torch.equal(*same)
    assert not torch.equal(same[0], stamp(x, "blended", alpha=0.2, seed=6))


@pytest.mark.parametrize("name, options", [
    ("badnets", {}), ("badnets", {"shape": "pixel"}), ("badnets", {"shape": "checkerboard"}),
    ("badnets", {"value": 0, "position": "top_left"}), ("badnets", {"position": "random", "size": 2}),
    ("blended", {"alpha": 0.9}), ("blended", {"pattern": "image"}),
], ids=lambda value: str(value))
def test_trigger_keeps_input_dtype_shape_and_leaves_input_alone(name, options):
    before = images(n=6, high=256)
    copy = before.clone()
    after = stamp(before, name, **options)
    assert torch.equal(before, copy)
    assert after.dtype == torch.uint8 and after.shape == before.shape
    assert after.data_ptr() != before.data_ptr()
    assert not torch.equal(after, before)


@pytest.mark.parametrize("name", attack_names())
def test_every_attack_keeps_dtype_shape_and_device_and_leaves_its_input_alone(name):
    """Poisons and test-time triggers of every registered attack, on MNIST-, CIFAR- and odd-shaped images (the
    poisons only for attacks that need no preparation: label_consistent's needs a trained surrogate)."""
    attack = backdoor(name)
    for shape in ((1, 28, 28), (3, 32, 32), (3, 16, 24)):
        x = torch.randint(1, 255, (4, *shape), generator=G().manual_seed(0), dtype=torch.uint8)
        copy = x.clone()
        steps = [attack.apply] + ([attack.poison] if type(attack).prepare is Backdoor.prepare else [])
        for step in steps:
            out = step(x, G().manual_seed(1))
            assert out.dtype == torch.uint8 and out.shape == x.shape and out.device == x.device
            assert not torch.equal(out, x) and out.data_ptr() != x.data_ptr()
        assert torch.equal(x, copy)


def test_ids_name_the_attack_and_the_settings_that_differ_from_the_defaults():
    assert backdoor("badnets").id == "badnets"
    assert backdoor("badnets", {"size": 2, "position": "3,4"}).id == "badnets-size=2-position=3_4"
    assert backdoor("blended", {"pattern": "image"}).id == "blended-pattern=image"
    ids = {backdoor("badnets", {"shape": shape}).id for shape in ("square", "pixel", "checkerboard")}
    assert len(ids | {backdoor("blended").id}) == 4


# ------------------------------------------------------------ random positions

def test_random_positions_differ_per_image_fit_and_follow_the_generator():
    """Each image gets its own whole patch somewhere inside it; the same generator seed, the same places."""
    before = torch.zeros(200, 1, HEIGHT, WIDTH, dtype=torch.uint8)
    attack = backdoor("badnets", {"position": "random", "size": 3})
    after = attack.apply(before, G().manual_seed(1))
    again = attack.apply(before, G().manual_seed(1))
    assert torch.equal(after, again) and not torch.equal(after, attack.apply(before, G().manual_seed(2)))
    origins = set()
    for image in after[:, 0]:
        rows, cols = torch.nonzero(image, as_tuple=True)
        assert len(rows) == 9  # the whole 3x3 patch, never cut by the border
        row, col = int(rows.min()), int(cols.min())
        assert box(row, col, 3) == set(zip(rows.tolist(), cols.tolist()))
        origins.add((row, col))
    assert len(origins) > 40  # 8 x 10 = 80 places; 200 draws land on most of them
    assert {r for r, _ in origins} == set(range(HEIGHT - 2)) and {c for _, c in origins} == set(range(WIDTH - 2))


def test_the_natural_image_pattern_is_a_photograph_in_gray_for_one_channel():
    gray = stamp(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "blended", pattern="image", alpha=1.0)
    colour = stamp(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "blended", pattern="image", alpha=1.0)
    assert torch.equal(gray[0], gray[1]) and gray.shape == (2, 1, 28, 28)
    # a photograph, not noise: neighbouring pixels are alike (noise's neighbours differ by ~85 on average)
    assert (gray[0, 0, :, 1:].float() - gray[0, 0, :, :-1].float()).abs().mean() < 30
    assert gray.float().std() > 20 and colour.float().std() > 20
    assert not torch.equal(colour[0, 0], colour[0, 2])  # the colour channels keep their colours


# ------------------------------------------------------ invalid settings

@pytest.mark.parametrize("name, options, message", [
    ("badnets", {"shape": "star"}, r"unknown badnets shape 'star'; valid: \['square', 'checkerboard', 'pixel'\]"),
    ("badnets", {"value": 256}, r"outside \[0, 255\]"),
    ("badnets", {"value": -1}, r"outside \[0, 255\]"),
    ("badnets", {"size": 0}, "at least 1 pixel"),
    ("badnets", {"colour": 3}, r"unknown option\(s\) \['colour'\] of the badnets attack; valid: \['shape'"),
    ("blended", {"alpha": 0.0}, "alpha"),
    ("blended", {"alpha": 1.5}, "alpha"),
    ("blended", {"pattern": "kitty"}, r"valid: \['noise', 'image'\]"),
    ("trojan", {}, r"unknown backdoor attack 'trojan'; valid: \[.*'badnets', 'blended'"),
])
def test_invalid_attack_settings_raise(name, options, message):
    with pytest.raises(RobustDataError, match=message):
        backdoor(name, options)


def test_every_module_of_the_package_is_an_attack_found_by_its_name():
    for name in attack_names():
        attack = backdoor(name)
        assert attack.name == name and type(attack).__module__ == f"robustdata.poison.{name}"
    assert {"badnets", "blended"} <= set(attack_names())
    assert not {"base", "plant", "targeting"} & set(attack_names())


@pytest.mark.parametrize("options, message", [
    ({"size": 11}, "does not fit"),                     # taller than the 10-row image
    ({"size": 3, "position": "8,0"}, "does not fit"),   # runs off the bottom
    ({"size": 3, "position": "0,10"}, "does not fit"),  # runs off the right
    ({"shape": "pixel", "position": "10,0"}, "does not fit"),
    ({"size": 3, "position": "-1,0"}, "does not fit"),
    ({"size": 9, "margin": 2}, "does not fit"),          # fits only without the margin
    ({"size": 11, "position": "random"}, "does not fit"),
    ({"position": "middle"}, "bottom_right"),            # lists the valid corner names
    ({"position": "1;2"}, "row,col"),
])
def test_patch_that_does_not_fit_raises(options, message):
    with pytest.raises(RobustDataError, match=message):
        stamp(images(), **options)


@pytest.mark.parametrize("bad", [images().float(), images()[0]])
@pytest.mark.parametrize("name", ["badnets", "blended"])
def test_attacks_want_uint8_nchw(bad, name):
    with pytest.raises(RobustDataError, match="uint8"):
        stamp(bad, name)


# -------------------------------------------------------------- targeting

@pytest.mark.parametrize("targeting, expected", [
    (Targeting("all_to_one", (2,)), [2, 2, -1, 2]),
    (Targeting("source_specific", (0,), (3,)), [-1, -1, -1, 0]),
    (Targeting("source_specific", (0,), (1, 3)), [-1, 0, -1, 0]),
    (Targeting("multi_target", (0, 1)), [-1, -1, 0, 1]),       # classes 2, 3 dealt to 0, 1 in turn
    (Targeting("multi_target", (3, 1, 0)), [-1, -1, 3, -1]),   # only class 2 is left: to the first target
    (Targeting("all_to_all", ()), [1, 2, 3, 0]),
], ids=lambda value: str(value))
def test_each_class_goes_to_its_target(targeting, expected):
    assert targeting.class_targets(NUM_CLASSES).tolist() == expected
    labels = torch.tensor([3, 0, 2, 2, 1])
    assert targeting.target_of(labels, NUM_CLASSES).tolist() == [expected[c] for c in labels.tolist()]


@pytest.mark.parametrize("targeting, message", [
    (Targeting("all_to_one", (0, 1)), r"all_to_one takes 1-1 target classes, got \[0, 1\]"),
    (Targeting("multi_target", (0,)), "multi_target takes 2-3 target classes"),
    (Targeting("multi_target", (0, 1, 2, 3)), "multi_target takes 2-3 target classes"),
    (Targeting("all_to_all", (0,)), "all_to_all takes 0-0 target classes"),
    (Targeting("source_specific", (0,)), "source classes go with source_specific"),
    (Targeting("all_to_one", (0,), (1,)), "source classes go with source_specific"),
    (Targeting("source_specific", (2,), (2,)), "must differ"),
    (Targeting("multi_target", (1, 1)), "must differ"),
    (Targeting("source_specific", (1,), (7,)), "source class 7 is not a label"),
    (Targeting("all_to_one", (-1,)), "target class -1 is not a label"),
    (Targeting("one_to_none", (0,)), "unknown targeting 'one_to_none'"),
])
def test_targetings_that_do_not_fit_raise(targeting, message):
    with pytest.raises(RobustDataError, match=message):
        targeting.class_targets(NUM_CLASSES)


# ---------------------------------------------------------- choose_poisons

BADNETS = BadNets()


def choose(labels, targeting=ALL_TO_ONE, rate=None, count=None, seed=0, attack=BADNETS):
    return choose_poisons(labels, attack, targeting, Dose(rate, count), NUM_CLASSES, G().manual_seed(seed))


@pytest.mark.parametrize("targeting, rate, count, message", [
    (ALL_TO_ONE, 0.1, 5, "exactly one of the poison rate and count"),
    (ALL_TO_ONE, None, None, "exactly one of the poison rate and count"),
    (ALL_TO_ONE, 1.5, None, "rate 1.5"),
    (ALL_TO_ONE, -0.1, None, "rate -0.1"),
    (ALL_TO_ONE, None, -1, "count -1"),
    (ALL_TO_ONE, None, 151, "151 poisons asked but only 150"),     # all-to-one: 3 x 50
    (Targeting("source_specific", (0,), (1,)), None, 51, "51 poisons asked but only 50"),
    (Targeting("source_specific", (0,), (1,)), 0.3, None, "60 poisons asked but only 50"),  # rate of all 200
])
def test_invalid_doses_raise(targeting, rate, count, message):
    with pytest.raises(RobustDataError, match=message):
        choose(balanced_labels(), targeting, rate, count)


def test_all_to_one_never_picks_the_target():
    labels = balanced_labels()
    for target in range(NUM_CLASSES):
        index = choose(labels, Targeting("all_to_one", (target,)), count=150, seed=target)
        assert len(index) == 150  # every eligible image
        assert (labels[index] != target).all()
        assert set(labels[index].tolist()) == set(range(NUM_CLASSES)) - {target}


def test_source_specific_picks_only_the_sources():
    labels = balanced_labels()
    index = choose(labels, Targeting("source_specific", (0,), (2,)), count=30, seed=1)
    assert len(index) == 30 and (labels[index] == 2).all()
    index = choose(labels, Targeting("source_specific", (0,), (1, 2)), count=100, seed=1)
    assert set(labels[index].tolist()) == {1, 2}


def test_all_to_all_picks_from_every_class():
    index = choose(balanced_labels(), Targeting("all_to_all", ()), count=200)
    assert len(index) == 200


@pytest.mark.parametrize("rate, count, expected", [
    (0.05, None, 10),    # 5% of all 200 images
    (0.1, None, 20),
    (0.0, None, 0),
    (None, 17, 17),
    (None, 0, 0),
    (None, 150, 150),
])
def test_rate_or_count_gives_the_exact_number(rate, count, expected):
    index = choose(balanced_labels(), Targeting("all_to_one", (3,)), rate, count)
    assert len(index) == expected
    assert len(set(index.tolist())) == expected  # no image poisoned twice
    assert torch.equal(index, index.sort().values)


def test_same_seed_same_poisons_different_seed_different():
    labels = balanced_labels()
    first, again, other = (choose(labels, Targeting("all_to_one", (1,)), rate=0.1, seed=seed) for seed in (42, 42, 43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_choices_cover_the_eligible_images_uniformly():
    """Over many seeds every eligible image is picked, about equally often (a drawn, not a fixed, subset)."""
    labels = balanced_labels(per_class=10)  # 30 eligible images, 6 poisons per draw
    counts = torch.zeros(len(labels))
    draws = 500
    for seed in range(draws):
        counts[choose(labels, count=6, seed=seed)] += 1
    assert (counts[labels == 0] == 0).all()
    frequency = counts[labels != 0] / draws
    assert (frequency - 6 / 30).abs().max() < 0.07  # binomial sd is 0.018 at 500 draws


@dataclass(frozen=True)
class CleanLabelSquare(BadNets):
    """A clean-label twin of BadNets (not registered): poisons images of the target class, keeps labels."""

    clean_label = True


def test_a_clean_label_attack_poisons_the_target_class_at_a_rate_of_that_class():
    labels = balanced_labels()  # 50 per class
    index = choose(labels, Targeting("all_to_one", (2,)), rate=0.3, attack=CleanLabelSquare())
    assert len(index) == 15 and (labels[index] == 2).all()  # 30% of class 2, not of the set
    index = choose(labels, Targeting("multi_target", (1, 3)), rate=0.5, attack=CleanLabelSquare())
    assert len(index) == 50 and set(labels[index].tolist()) == {1, 3}
    with pytest.raises(RobustDataError, match="clean-label attack: it takes all_to_one, source_specific"):
        choose(labels, Targeting("all_to_all", ()), rate=0.1, attack=CleanLabelSquare())


# ------------------------------------------------------------------- plant

@pytest.mark.parametrize("attack, targeting, dose", [
    (BadNets(), Targeting("all_to_one", (2,)), Dose(0.1)),
    (BadNets(shape="pixel", position="top_left"), Targeting("source_specific", (0,), (3,)), Dose(None, 12)),
    (BadNets(shape="checkerboard"), Targeting("multi_target", (0, 1)), Dose(0.2)),
    (BadNets(position="random"), Targeting("all_to_all", ()), Dose(0.3)),
], ids=["all-to-one", "source-specific-pixel", "multi-target-checkerboard", "all-to-all-random"])
def test_plant_marks_exactly_the_changed_rows_and_relabels_them_to_their_targets(attack, targeting, dose):
    labels = balanced_labels()
    x = images(n=len(labels), seed=3)
    x[x == 0] = 1  # no pixel is already 0 or 255, so every stamp (255 and 0 checker cells) changes its row
    before_x, before_y = x.clone(), labels.clone()
    planted = plant(x, labels, attack, targeting, dose, NUM_CLASSES, G().manual_seed(5))
    out_x, out_y, is_poison = planted.images, planted.labels, planted.is_poison

    assert torch.equal(x, before_x) and torch.equal(labels, before_y)
    assert is_poison.dtype == torch.bool and len(is_poison) == len(labels)
    assert not planted.is_cover.any()  # badnets has no cover samples
    changed = (out_x != x).flatten(1).any(1)
    assert torch.equal(changed, is_poison)
    assert int(is_poison.sum()) == dose.num_poisons(len(labels))
    expected_targets = torch.tensor(targeting.class_targets(NUM_CLASSES).tolist())[labels]
    assert torch.equal(out_y[is_poison], expected_targets[is_poison]) and (expected_targets[is_poison] >= 0).all()
    assert torch.equal(out_y[~is_poison], labels[~is_poison])
    assert torch.equal(out_x[~is_poison], x[~is_poison])
    if attack.position != "random":
        assert torch.equal(out_x[is_poison], attack.apply(x[is_poison], G()))
    # the same generator seed picks the same rows as choose_poisons
    expected = choose_poisons(labels, attack, targeting, dose, NUM_CLASSES, G().manual_seed(5))
    assert torch.equal(torch.nonzero(is_poison).flatten(), expected)


def test_plant_with_a_clean_label_attack_keeps_every_label():
    labels = balanced_labels()
    x = images(n=len(labels), seed=4)
    planted = plant(x, labels, CleanLabelSquare(), Targeting("all_to_one", (1,)), Dose(0.2), NUM_CLASSES, G())
    assert torch.equal(planted.labels, labels)
    assert int(planted.is_poison.sum()) == 10 and (labels[planted.is_poison] == 1).all()


def test_cover_samples_of_an_attack_without_them_are_refused():
    with pytest.raises(RobustDataError, match="the badnets attack has no cover samples"):
        plant(images(n=200), balanced_labels(), BADNETS, ALL_TO_ONE, Dose(0.1, cover_ratio=1.0), NUM_CLASSES, G())


# ------------------------------------------------------ triggered test set

@pytest.mark.parametrize("attack, targeting, eligible_labels", [
    (BadNets(), Targeting("all_to_one", (2,)), {0, 1, 3}),
    (backdoor("blended", {"alpha": 0.5}), Targeting("source_specific", (0,), (3,)), {3}),
    (BadNets(), Targeting("all_to_all", ()), {0, 1, 2, 3}),
], ids=["all-to-one", "source-to-target", "all-to-all"])
def test_triggered_test_set_covers_every_source_image(attack, targeting, eligible_labels):
    labels = balanced_labels(per_class=7)
    x = images(n=len(labels), seed=9, high=256)
    before = x.clone()
    triggered, target_labels, true_labels = triggered_test_set(x, labels, attack, targeting, NUM_CLASSES, G())

    keep = torch.tensor([int(label) in eligible_labels for label in labels])
    assert len(triggered) == len(target_labels) == len(true_labels) == int(keep.sum()) == 7 * len(eligible_labels)
    assert torch.equal(target_labels, targeting.class_targets(NUM_CLASSES)[labels[keep]])
    assert (target_labels != true_labels).all()
    assert torch.equal(true_labels, labels[keep])
    assert torch.equal(triggered, attack.apply(x[keep], G()))
    assert torch.equal(x, before)
