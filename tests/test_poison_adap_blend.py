"""Adaptive-Blend: each poison and cover blends exactly its drawn pieces of the pattern at the training alpha,
the test trigger the whole pattern at the test alpha; covers keep their labels through plant().

Pixel values are worked out by hand from the seed-0 noise pattern of a 1 x 2 x 2 image ([[172, 47],
[117, 192]], pinned below) and piece boundaries are written out by hand, so a wrong alpha, a wrong grid or a
wrong subset size fails here rather than passing by recomputing the module's own arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.adap_blend import AdapBlend
from robustdata.poison.blended import natural_pattern
from robustdata.poison.plant import Dose, plant
from robustdata.poison.targeting import Targeting


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison modules never import prefect."""


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=gen(seed), dtype=torch.uint8)


TINY = torch.tensor([[[[100, 100], [0, 255]]]], dtype=torch.uint8)  # 1 x 1 x 2 x 2
# seed-0 noise pattern of a 1 x 2 x 2 image: torch.randint(0, 256, (1, 2, 2), Generator.manual_seed(0))
PATTERN = [[172, 47], [117, 192]]


# ---------------------------------------------------------------- registry and options

def test_found_by_name_with_the_toolbox_defaults():
    assert "adap_blend" in attack_names()
    attack = backdoor("adap_blend")
    assert isinstance(attack, AdapBlend)
    assert (attack.pattern, attack.alpha, attack.test_alpha) == ("image", 0.15, 0.2)
    assert (attack.pieces, attack.mask_rate, attack.kept_pieces) == (16, 0.5, 8)
    assert attack.cover_ratio == 1 and not attack.clean_label
    assert backdoor("adap_blend", {"alpha": 0.1, "pieces": 9}).id == "adap_blend-alpha=0.1-pieces=9"
    assert backdoor("adap_blend", {"mask_rate": 0.25}).kept_pieces == 12


@pytest.mark.parametrize("options, message", [
    ({"pattern": "kitty"}, "unknown adap_blend pattern 'kitty'; valid: ['image', 'noise']"),
    ({"alpha": 0}, "adap_blend alpha 0 is outside [1e-06, 1]"),
    ({"alpha": 1.5}, "adap_blend alpha 1.5 is outside [1e-06, 1]"),
    ({"test_alpha": -0.2}, "adap_blend test_alpha -0.2 is outside [1e-06, 1]"),
    ({"pieces": 15}, "adap_blend pieces 15 must be a square number"),
    ({"pieces": 0}, "adap_blend pieces 0 must be a square number"),
    ({"pieces": 16.0}, "adap_blend pieces 16.0 must be a square number"),
    ({"mask_rate": -0.1}, "adap_blend mask_rate -0.1 is outside [0, 1]"),
    ({"mask_rate": 1.0}, "mask_rate 1.0 leaves none of the 16 pieces in a poison"),
    ({"size": 3}, "unknown option(s) ['size'] of the adap_blend attack; valid: ['pattern', 'alpha', "
                  "'test_alpha', 'pieces', 'mask_rate', 'seed']"),
])
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(RobustDataError) as error:
        backdoor("adap_blend", options)
    assert message in str(error.value)


def test_a_grid_finer_than_the_image_is_refused():
    with pytest.raises(RobustDataError, match="a 5 x 5 adap_blend grid does not fit a 4x4 image"):
        backdoor("adap_blend", {"pieces": 25}).poison(images(2, (1, 4, 4)), gen())


def test_non_uint8_images_are_refused():
    with pytest.raises(RobustDataError, match="uint8"):
        backdoor("adap_blend").poison(torch.zeros(2, 1, 8, 8), gen())


# ---------------------------------------------------------------- test-time trigger

def test_test_trigger_blends_the_whole_pattern_at_the_test_alpha():
    out = backdoor("adap_blend", {"pattern": "noise"}).apply(TINY, gen())
    # 0.8 x + 0.2 p: 80 + 34.4, 80 + 9.4, 0 + 23.4, 204 + 38.4, rounded
    assert out.tolist() == [[[[114, 89], [23, 242]]]]
    full = backdoor("adap_blend", {"pattern": "noise", "test_alpha": 1.0}).apply(TINY, gen())
    assert full.tolist() == [[PATTERN]]


def test_test_trigger_is_fixed_by_the_attack_seed_not_the_generator():
    attack = backdoor("adap_blend", {"pattern": "noise", "test_alpha": 1.0})
    x = images(3, (3, 8, 8))
    assert torch.equal(attack.apply(x, gen(0)), attack.apply(x, gen(99)))
    assert torch.equal(attack.apply(x[:1], gen(0))[0], attack.apply(x[2:], gen(0))[0])  # the same for every image
    other = backdoor("adap_blend", {"pattern": "noise", "test_alpha": 1.0, "seed": 1}).apply(x, gen(0))
    assert not torch.equal(attack.apply(x, gen(0)), other)


def test_image_pattern_is_the_natural_photograph_of_blended():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    full = backdoor("adap_blend", {"test_alpha": 1.0}).apply(x, gen())
    assert torch.equal(full[0], natural_pattern(3, 32, 32).round().to(torch.uint8))
    gray = backdoor("adap_blend", {"test_alpha": 1.0}).apply(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), gen())
    assert gray.shape == (1, 1, 28, 28) and gray.float().std() > 10  # a picture, not a flat field


# ---------------------------------------------------------------- training poisons: pieces

def test_each_poison_blends_exactly_half_of_single_pixel_pieces_at_the_training_alpha():
    attack = backdoor("adap_blend", {"pattern": "noise", "pieces": 4})  # 2 x 2 grid of 1-pixel pieces
    x = TINY.expand(200, -1, -1, -1).contiguous()
    out = attack.poison(x, gen())
    # 0.85 x + 0.15 p: 85 + 25.8, 85 + 7.05, 0 + 17.55, 216.75 + 28.8, rounded
    blended = torch.tensor([[[110.8, 92.05], [17.55, 245.55]]]).round().to(torch.uint8)
    assert blended.tolist() == [[[111, 92], [18, 246]]]
    changed = out != x
    assert ((out == x) | (out == blended)).all()          # each pixel: untouched or blended at alpha 0.15
    assert (changed.flatten(1).sum(1) == 2).all()         # exactly 2 of the 4 pieces per image
    subsets = {tuple(row) for row in changed.flatten(1).tolist()}
    assert len(subsets) == 6                              # all C(4, 2) subsets turn up in 200 draws
    assert (changed.float().mean(0) - 0.5).abs().max() < 0.1  # each piece in about half the poisons


def hand_pieces(bands: list[range]) -> list[set[tuple[int, int]]]:
    """Pixels of each piece, row by row, given the row (= column) bands."""
    return [{(r, c) for r in rows for c in cols} for rows in bands for cols in bands]


@pytest.mark.parametrize("size, bands", [
    (8, [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]),
    (10, [range(0, 3), range(3, 5), range(5, 8), range(8, 10)]),  # floor(4 r / 10): bands 3, 2, 3, 2 wide
])
def test_poisons_blend_whole_pieces_of_a_4x4_grid(size, bands):
    full = backdoor("adap_blend", {"pattern": "noise", "test_alpha": 1.0}).apply(
        torch.zeros(1, 3, size, size, dtype=torch.uint8), gen())
    x = (255 - full).expand(50, -1, -1, -1).contiguous()  # differs from the pattern at every pixel
    out = backdoor("adap_blend", {"pattern": "noise", "alpha": 1.0}).poison(x, gen(3))
    assert ((out == x) | (out == full)).all()
    pieces = hand_pieces(bands)
    assert set().union(*pieces) == {(r, c) for r in range(size) for c in range(size)}
    for before, after in zip(x, out):
        changed = {tuple(p) for p in torch.nonzero((before != after).any(0)).tolist()}
        taken = [piece for piece in pieces if piece <= changed]
        assert len(taken) == 8 and set().union(*taken) == changed  # 8 whole pieces, nothing else


def test_piece_draws_come_from_the_generator_and_are_reproducible():
    attack = backdoor("adap_blend", {"pattern": "noise"})
    x = images(20, (3, 8, 8))
    first = attack.poison(x, gen(5))
    assert torch.equal(first, attack.poison(x, gen(5)))
    assert not torch.equal(first, attack.poison(x, gen(6)))
    used = gen(5)
    attack.poison(x, used)
    assert not torch.equal(torch.rand(4, generator=used), torch.rand(4, generator=gen(5)))  # it drew from it


def test_cover_samples_are_planted_like_poisons():
    attack = backdoor("adap_blend", {"pattern": "noise"})
    x = images(10, (1, 8, 8))
    assert torch.equal(attack.cover(x, gen(2)), attack.poison(x, gen(2)))


# ---------------------------------------------------------------- plant: covers keep their labels

def test_plant_relabels_poisons_and_keeps_cover_labels():
    x = images(80, (1, 8, 8), seed=1)
    labels = torch.arange(4).repeat(20)
    attack = backdoor("adap_blend", {"pattern": "noise"})
    planted = plant(x, labels, attack, Targeting("all_to_one", (0,)), Dose(rate=0.1), 4, gen(7))
    poisons, covers = planted.is_poison, planted.is_cover
    assert int(poisons.sum()) == 8 and int(covers.sum()) == 8  # cover_ratio 1: one cover per poison
    assert not (poisons & covers).any()
    assert (labels[poisons] != 0).all() and (planted.labels[poisons] == 0).all()
    assert torch.equal(planted.labels[~poisons], labels[~poisons])  # covers and clean keep their labels
    assert (planted.images[covers] != x[covers]).flatten(1).any(1).all()
    untouched = ~(poisons | covers)
    assert torch.equal(planted.images[untouched], x[untouched])
    more = plant(x, labels, attack, Targeting("all_to_one", (0,)), Dose(rate=0.1, cover_ratio=2), 4, gen(7))
    assert int(more.is_cover.sum()) == 16
