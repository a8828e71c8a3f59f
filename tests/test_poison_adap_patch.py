"""Adaptive-Patch: four patches at the toolbox's places; each poison and cover carries its drawn subset of
them at their training alphas, the test trigger the chosen ones at the test alpha; covers keep their labels.

Patch places on a 32 x 32 image are written out by hand from the toolbox's trigger files (phoenix_corner:
rows/cols 27-31; firefox_corner: rows 1-13, cols 18-30; badnet_patch4: the four 3 x 3 corners, white at
(0, 0), (0, 2), (1, 1), (2, 0) and their mirror images; trojan_square: rows/cols 21-28), and the 28 x 28
places from the 28/32 scaling by hand, so a misplaced or mis-sized patch fails here.
"""

from __future__ import annotations

import pytest
import torch

from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.adap_patch import AdapPatch
from robustdata.poison.plant import Dose, plant
from robustdata.poison.targeting import Targeting


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison modules never import prefect."""


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, shape: tuple[int, int, int] = (1, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=gen(seed), dtype=torch.uint8)


def box(row: int, col: int, size: int) -> set[tuple[int, int]]:
    return {(r, c) for r in range(row, row + size) for c in range(col, col + size)}


def corners(size: int, side: int) -> set[tuple[int, int]]:
    far = side - size
    return box(0, 0, size) | box(0, far, size) | box(far, 0, size) | box(far, far, size)


# the firefox-like round logo on 32 x 32: (first col, last col) of each of rows 1..13
LOGO_ROWS = [(22, 26), (20, 28), (19, 29), (19, 29)] + [(18, 30)] * 5 + [(19, 29), (19, 29), (20, 28), (22, 26)]
LOGO = {(row, col) for row, (first, last) in enumerate(LOGO_ROWS, start=1) for col in range(first, last + 1)}
PLACES_32 = [box(27, 27, 5), LOGO, corners(3, 32), box(21, 21, 8)]
# 28 x 28: lengths x 28/32 rounded (5 -> 4, 13 -> 11, 3 -> 3, 8 -> 7, offsets 1 -> 1, 3 -> 3)
BOXES_28 = [box(24, 24, 4), None, corners(3, 28), box(18, 18, 7)]
# 16 x 16: x 1/2, halves rounded up (5 -> 3, 3 -> 2, 8 -> 4, offset 3 -> 2)
BOXES_16 = [box(13, 13, 3), None, corners(2, 16), box(10, 10, 4)]


def changed(before: torch.Tensor, after: torch.Tensor) -> set[tuple[int, int]]:
    """(row, col) of every pixel changed in any image or channel."""
    return {tuple(p) for p in torch.nonzero((before != after).flatten(0, 1).any(0)).tolist()}


def place(attack_options: dict, trigger: int, shape: tuple[int, int, int]) -> set[tuple[int, int]]:
    """Where one trigger stamps, at full alpha: pixels it changes in an all-0 or an all-255 image."""
    attack = backdoor("adap_patch", {**attack_options, "test_triggers": [trigger], "test_alpha": 1.0})
    black, white = torch.zeros(1, *shape, dtype=torch.uint8), torch.full((1, *shape), 255, dtype=torch.uint8)
    return changed(black, attack.apply(black, gen())) | changed(white, attack.apply(white, gen()))


# ---------------------------------------------------------------- registry and options

def test_found_by_name_with_the_toolbox_defaults():
    assert "adap_patch" in attack_names()
    attack = backdoor("adap_patch")
    assert isinstance(attack, AdapPatch)
    assert attack.alphas == (0.5, 0.2, 0.5, 0.3) and attack.per_image == 1
    assert attack.test_triggers == (0, 2) and attack.test_alpha == 1.0
    assert attack.cover_ratio == 2 and not attack.clean_label
    from_json = backdoor("adap_patch", {"test_triggers": [0, 1, 2, 3], "alphas": [0.5, 0.2, 0.5, 0.3]})
    assert from_json.test_triggers == (0, 1, 2, 3) and from_json.alphas == (0.5, 0.2, 0.5, 0.3)
    assert from_json.id == "adap_patch-test_triggers=(0_1_2_3)"  # a list equal to the default is the default
    hash(from_json)


@pytest.mark.parametrize("options, message", [
    ({"alphas": [0.5, 0.5, 0.5]}, "adap_patch alphas [0.5, 0.5, 0.5]: give one per trigger (4)"),
    ({"alphas": [0.5, 0, 0.5, 0.3]}, "adap_patch alpha 0 is outside [1e-06, 1]"),
    ({"alphas": [0.5, 0.2, 1.5, 0.3]}, "adap_patch alpha 1.5 is outside [1e-06, 1]"),
    ({"per_image": 0}, "adap_patch per_image 0 must be 1..4 triggers"),
    ({"per_image": 5}, "adap_patch per_image 5 must be 1..4 triggers"),
    ({"per_image": 1.5}, "adap_patch per_image 1.5 must be 1..4 triggers"),
    ({"test_triggers": []}, "adap_patch test_triggers []: give distinct trigger numbers among [0, 1, 2, 3]"),
    ({"test_triggers": [4]}, "adap_patch test_triggers [4]: give distinct trigger numbers among [0, 1, 2, 3]"),
    ({"test_triggers": [1, 1]}, "adap_patch test_triggers [1, 1]: give distinct"),
    ({"test_alpha": 0}, "adap_patch test_alpha 0 is outside [1e-06, 1]"),
    ({"k": 4}, "unknown option(s) ['k'] of the adap_patch attack; valid: ['alphas', 'per_image', "
               "'test_triggers', 'test_alpha', 'seed']"),
])
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(RobustDataError) as error:
        backdoor("adap_patch", options)
    assert message in str(error.value)


def test_an_image_too_small_for_the_patches_is_refused():
    with pytest.raises(RobustDataError, match="the adap_patch triggers do not fit a 1x1 image"):
        backdoor("adap_patch").apply(torch.zeros(2, 1, 1, 1, dtype=torch.uint8), gen())


# ---------------------------------------------------------------- where the patches are

@pytest.mark.parametrize("trigger", range(4))
def test_patches_sit_where_the_toolbox_files_put_them_on_32x32(trigger):
    assert place({}, trigger, (3, 32, 32)) == PLACES_32[trigger]


@pytest.mark.parametrize("trigger", [0, 2, 3])
def test_patches_scale_to_28x28_and_16x16(trigger):
    assert place({}, trigger, (1, 28, 28)) == BOXES_28[trigger]
    assert place({}, trigger, (3, 16, 16)) == BOXES_16[trigger]


def test_logo_scales_to_28x28_inside_its_box():
    logo = place({}, 1, (1, 28, 28))
    rows, cols = {r for r, _ in logo}, {c for _, c in logo}
    assert (min(rows), max(rows), min(cols), max(cols)) == (1, 11, 16, 26)  # 11 across, 1 off top and right
    assert (6, 21) in logo and (1, 16) not in logo  # round: the centre in, the box's corner out


def test_checkerboard_corners_hold_the_toolbox_values_at_each_alpha():
    x = torch.full((1, 1, 32, 32), 100, dtype=torch.uint8)
    full = backdoor("adap_patch", {"test_triggers": [2]}).apply(x, gen())[0, 0]
    assert full[:3, :3].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 0]]
    assert full[29:, 29:].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    half = backdoor("adap_patch", {"test_triggers": [2], "test_alpha": 0.5}).apply(x, gen())[0, 0]
    # 0.5 * 100 + 0.5 * 255 = 177.5 (rounds to even: 178), 0.5 * 100 + 0 = 50
    assert half[:3, :3].tolist() == [[178, 50, 178], [50, 178, 50], [178, 50, 50]]
    assert (half[3:29, :] == 100).all() and (half[:, 3:29] == 100).all()


# ---------------------------------------------------------------- test-time trigger

def test_default_test_trigger_stamps_triggers_0_and_2_at_full_strength():
    x = torch.full((2, 1, 32, 32), 100, dtype=torch.uint8)
    out = backdoor("adap_patch").apply(x, gen())
    assert changed(x, out) <= PLACES_32[0] | PLACES_32[2]
    assert changed(x, out) >= PLACES_32[2]
    # the checkerboard is blended after the corner patch: at alpha 1 it overwrites the shared 3 x 3 corner
    assert out[0, 0, 29:, 29:].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    alone = backdoor("adap_patch", {"test_triggers": [0]}).apply(x, gen())
    assert torch.equal(out[:, :, 27:29, 27:32], alone[:, :, 27:29, 27:32])  # the corner patch above it, intact
    assert torch.equal(out[0], out[1])


def test_test_trigger_is_fixed_by_the_attack_seed_not_the_generator():
    attack = backdoor("adap_patch", {"test_triggers": [0, 1, 2, 3]})
    x = images(3, (3, 32, 32))
    assert torch.equal(attack.apply(x, gen(0)), attack.apply(x, gen(42)))
    other = backdoor("adap_patch", {"test_triggers": [0, 1, 2, 3], "seed": 1}).apply(x, gen(0))
    assert not torch.equal(attack.apply(x, gen(0)), other)
    assert torch.equal(attack.apply(x, gen(0))[:, :, :3, :3], other[:, :, :3, :3])  # the checkerboard is fixed


# ---------------------------------------------------------------- training poisons: subsets

# pixels only one trigger touches on 32 x 32 (trigger 0 shares its corner with 2 and its top-left with 3)
EXCLUSIVE = [PLACES_32[j] - set().union(*(PLACES_32[i] for i in range(4) if i != j)) for j in range(4)]


def carried(before: torch.Tensor, after: torch.Tensor) -> list[set[int]]:
    """The triggers each poison carries, read off the pixels only that trigger touches."""
    return [{j for j in range(4) if any((b[:, r, c] != a[:, r, c]).any() for r, c in EXCLUSIVE[j])}
            for b, a in zip(before, after)]


@pytest.mark.parametrize("per_image", [1, 2, 3])
def test_each_poison_carries_exactly_its_drawn_triggers(per_image):
    attack = backdoor("adap_patch", {"alphas": [1, 1, 1, 1], "per_image": per_image})
    x = images(120, (3, 32, 32), seed=4)
    out = attack.poison(x, gen(1))
    sets = carried(x, out)
    assert all(len(s) == per_image for s in sets)
    for before, after, s in zip(x, out, sets):  # and nothing outside the carried triggers' places
        assert changed(before[None], after[None]) <= set().union(*(PLACES_32[j] for j in s))
    counts = [sum(j in s for s in sets) for j in range(4)]
    assert all(abs(count - 120 * per_image / 4) < 20 for count in counts)  # each trigger about as often


def test_training_alphas_are_per_trigger():
    x = torch.full((400, 1, 32, 32), 100, dtype=torch.uint8)
    out = backdoor("adap_patch").poison(x, gen(2))
    corner = out[:, 0, 0, 0]  # only the checkerboard (alpha 0.5) touches (0, 0): 177.5 -> 178 or untouched
    assert set(corner.tolist()) == {100, 178}
    full = backdoor("adap_patch", {"test_triggers": [1]}).apply(x[:1], gen())[0, 0]  # the logo's own colours
    carrying = out[:, 0, 7, 24] != 100
    assert 60 < int(carrying.sum()) < 140  # about a quarter of the poisons carry the logo
    expected = (0.8 * 100 + 0.2 * full[7, 24].float()).round()
    assert (out[carrying, 0, 7, 24].float() == expected).all()  # the logo at alpha 0.2


def test_draws_come_from_the_generator_and_are_reproducible():
    attack = backdoor("adap_patch")
    x = images(30, (3, 32, 32))
    first = attack.poison(x, gen(5))
    assert torch.equal(first, attack.poison(x, gen(5)))
    assert not torch.equal(first, attack.poison(x, gen(6)))
    assert torch.equal(attack.cover(x, gen(5)), first)  # covers are planted like poisons


# ---------------------------------------------------------------- plant: covers keep their labels

def test_plant_relabels_poisons_and_keeps_two_covers_per_poison():
    x = images(100, (1, 28, 28), seed=1)
    labels = torch.arange(5).repeat(20)
    planted = plant(x, labels, backdoor("adap_patch"), Targeting("all_to_one", (0,)), Dose(rate=0.1), 5, gen(3))
    poisons, covers = planted.is_poison, planted.is_cover
    assert int(poisons.sum()) == 10 and int(covers.sum()) == 20 and not (poisons & covers).any()
    assert (labels[poisons] != 0).all() and (planted.labels[poisons] == 0).all()
    assert torch.equal(planted.labels[~poisons], labels[~poisons])
    assert (planted.images[covers] != x[covers]).flatten(1).any(1).all()
    untouched = ~(poisons | covers)
    assert torch.equal(planted.images[untouched], x[untouched])
