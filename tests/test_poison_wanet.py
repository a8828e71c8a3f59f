"""WaNet: the warp field is fixed by its own seed, planted fields move pixels exactly as computed by hand, covers
are the field plus per-image noise and keep their labels."""

from __future__ import annotations

import pytest
import torch

import robustdata.poison
from robustdata.errors import RobustDataError
from robustdata.poison import attack_names, backdoor
from robustdata.poison.plant import Dose, plant
from robustdata.poison.targeting import Targeting
from robustdata.poison.wanet import WaNet, cover_grids, warp, warp_grid


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the poison modules never import prefect."""


def images(n: int = 6, shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted_grid(height: int, width: int, dx_pixels: float, dy_pixels: float) -> torch.Tensor:
    """(H, W, 2): each pixel samples (dx, dy) pixels away, clamped to the image; written independently of the
    module (pixel index -> grid unit: 2 * index / (size - 1) - 1)."""
    cols = torch.tensor([2 * c / (width - 1) - 1 for c in range(width)])
    rows = torch.tensor([2 * r / (height - 1) - 1 for r in range(height)])
    x = (cols + 2 * dx_pixels / (width - 1)).clamp(-1, 1)[None, :].expand(height, width)
    y = (rows + 2 * dy_pixels / (height - 1)).clamp(-1, 1)[:, None].expand(height, width)
    return torch.stack((x, y), -1)


# ---------------------------------------------------------------- registry and options

def test_found_by_name_with_the_reference_defaults():
    assert "wanet" in attack_names()
    attack = backdoor("wanet")
    assert isinstance(attack, WaNet)
    assert (attack.k, attack.s, attack.grid_rescale) == (4, 0.5, 1.0)
    assert attack.cover_ratio == 2 and not attack.clean_label
    assert backdoor("wanet", {"s": 1.0, "seed": 3}).id == "wanet-s=1.0-seed=3"


@pytest.mark.parametrize("options, message", [
    ({"k": 1}, "k 1 must be an integer >= 2"),
    ({"k": 2.5}, "k 2.5 must be an integer >= 2"),
    ({"s": -0.1}, "s -0.1 must be a finite number >= 0"),
    ({"s": float("nan")}, "s nan must be a finite number >= 0"),
    ({"grid_rescale": 0}, "grid_rescale 0 must be in (0, 1]"),
    ({"grid_rescale": 1.2}, "grid_rescale 1.2 must be in (0, 1]"),
    ({"strength": 1}, "unknown option(s) ['strength'] of the wanet attack; valid: ['k', 's', 'grid_rescale', 'seed']"),
])
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(RobustDataError) as error:
        robustdata.poison.backdoor("wanet", options)
    assert message in str(error.value)


def test_refuses_float_images():
    with pytest.raises(RobustDataError, match="uint8"):
        backdoor("wanet").apply(images().float(), gen())


# ---------------------------------------------------------------- known answers

def test_warp_with_a_one_pixel_shift_moves_columns_left_and_clamps_at_the_border():
    image = torch.tensor([[[[1, 2, 3, 4],
                            [5, 6, 7, 8],
                            [9, 10, 11, 12]]]], dtype=torch.uint8)
    expected = torch.tensor([[[[2, 3, 4, 4],
                               [6, 7, 8, 8],
                               [10, 11, 12, 12]]]], dtype=torch.uint8)
    assert torch.equal(warp(image, shifted_grid(3, 4, dx_pixels=1, dy_pixels=0)), expected)
    expected_down = torch.tensor([[[[1, 2, 3, 4],
                                    [1, 2, 3, 4],
                                    [5, 6, 7, 8]]]], dtype=torch.uint8)
    assert torch.equal(warp(image, shifted_grid(3, 4, dx_pixels=0, dy_pixels=-1)), expected_down)


def test_warp_with_a_half_pixel_shift_averages_neighbours_and_rounds():
    image = torch.tensor([[[[0, 10, 21, 40]]], [[[100, 0, 255, 255]]]], dtype=torch.uint8).expand(2, 1, 2, 4)
    expected = torch.tensor([[[[5, 16, 30, 40]]], [[[50, 128, 255, 255]]]], dtype=torch.uint8).expand(2, 1, 2, 4)
    # 15.5 and 127.5 round half to even: 16 is even, 128 is even
    assert torch.equal(warp(image.contiguous(), shifted_grid(2, 4, dx_pixels=0.5, dy_pixels=0)), expected)


def test_planted_control_grid_gives_the_hand_computed_shift():
    # x offsets all 0.5, y offsets 0: the mean magnitude is 0.25, so the normalised x field is 2 everywhere and
    # the x offset is s * 2 / W grid units; s = W / (W - 1) makes that 2 / (W - 1), exactly one pixel (a
    # non-square image: scaling x by the height instead would move it 4/3 pixel: 40, 70, 90, 90 on row 0).
    height, width = 3, 4
    control = torch.stack([torch.full((3, 3), 0.5), torch.zeros(3, 3)])
    grid = warp_grid(control, s=width / (width - 1), grid_rescale=1.0, height=height, width=width)
    image = torch.tensor([[[[0, 30, 60, 90], [100, 130, 160, 190], [200, 210, 220, 230]]]], dtype=torch.uint8)
    expected = torch.tensor([[[[30, 60, 90, 90], [130, 160, 190, 190], [210, 220, 230, 230]]]], dtype=torch.uint8)
    assert torch.equal(warp(image, grid), expected)
    # and y: offsets -0.5 in y only move each row down by one pixel (s = H / (H - 1))
    control = torch.stack([torch.zeros(3, 3), torch.full((3, 3), -0.5)])
    grid = warp_grid(control, s=height / (height - 1), grid_rescale=1.0, height=height, width=width)
    expected = torch.tensor([[[[0, 30, 60, 90], [0, 30, 60, 90], [100, 130, 160, 190]]]], dtype=torch.uint8)
    assert torch.equal(warp(image, grid), expected)


def test_grid_rescale_zooms_towards_the_centre():
    # s = 0, grid_rescale 0.5 on a width-5 row: x in [-1, -0.5, 0, 0.5, 1] -> [-0.5, -0.25, 0, 0.25, 0.5], i.e.
    # pixel positions [1, 1.5, 2, 2.5, 3]
    row = torch.tensor([0, 10, 20, 40, 80], dtype=torch.uint8)
    image = row.expand(1, 1, 2, 5).contiguous()
    out = backdoor("wanet", {"s": 0, "grid_rescale": 0.5}).apply(image, gen())
    assert torch.equal(out, torch.tensor([10, 15, 20, 30, 40], dtype=torch.uint8).expand(1, 1, 2, 5))


def test_the_control_grids_scale_does_not_matter():
    control = torch.rand(2, 4, 4, generator=gen(5)) * 2 - 1
    assert torch.allclose(warp_grid(control, 0.5, 1.0, 28, 28), warp_grid(control * 7, 0.5, 1.0, 28, 28))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 5, 7)])
def test_s_zero_is_exactly_the_identity(shape):
    x = images(shape=shape)
    assert torch.equal(backdoor("wanet", {"s": 0}).apply(x, gen()), x)


def test_default_warp_is_small_but_changes_images():
    # s = 0.5: offsets average a fraction of a pixel and never reach a whole one on MNIST's 28 x 28
    attack = backdoor("wanet")
    cols = torch.tensor([2 * c / 27 - 1 for c in range(28)])
    pixels = (attack.grid(28, 28)[..., 0] - cols[None, :]) * 27 / 2
    assert 0.05 < pixels.abs().mean() < 0.5 and pixels.abs().max() < 1
    strong = backdoor("wanet", {"s": 30.0}).grid(28, 28)
    assert strong.abs().max() == 1  # a strong warp is clamped to the image, not sampled outside it
    x = images()
    assert (attack.apply(x, gen()) != x).float().mean() > 0.5


# ---------------------------------------------------------------- the fixed field

def test_the_warp_is_the_same_for_every_image_call_and_generator():
    attack = backdoor("wanet")
    x = images(n=5)
    x[3] = x[0]
    out = attack.apply(x, gen(0))
    assert torch.equal(out[3], out[0])
    assert torch.equal(out, attack.apply(x, gen(99)))
    assert torch.equal(out[2:3], attack.apply(x[2:3], gen(1)))
    assert torch.equal(attack.grid(28, 28), backdoor("wanet").grid(28, 28))


def test_the_warp_changes_with_its_seed_and_k():
    x = images()
    base = backdoor("wanet", {"s": 2.0}).apply(x, gen())
    assert not torch.equal(base, backdoor("wanet", {"s": 2.0, "seed": 1}).apply(x, gen()))
    assert not torch.equal(base, backdoor("wanet", {"s": 2.0, "k": 8}).apply(x, gen()))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 10, 12)])
def test_keeps_dtype_shape_and_leaves_the_input_alone(shape):
    x = images(shape=shape)
    copy = x.clone()
    attack = backdoor("wanet")
    for out in (attack.apply(x, gen()), attack.cover(x, gen())):
        assert out.dtype == torch.uint8 and out.shape == x.shape and out.data_ptr() != x.data_ptr()
    assert torch.equal(x, copy)
    assert attack.apply(x[:0], gen()).shape == (0, *shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_images_device():
    x = images()
    attack = backdoor("wanet")
    out, cover = attack.apply(x.cuda(), gen()), attack.cover(x.cuda(), gen(1))
    assert out.device.type == "cuda" and cover.device.type == "cuda"
    assert (out.cpu().int() - attack.apply(x, gen()).int()).abs().max() <= 1


# ---------------------------------------------------------------- covers (noise mode)

def test_cover_grids_are_the_field_plus_at_most_one_size_step_of_noise():
    grid = backdoor("wanet").grid(10, 12)
    covers = cover_grids(grid, 3, gen())
    difference = (covers - grid).abs()
    assert (difference[..., 0] <= 1 / 12 + 1e-6).all() and (difference[..., 1] <= 1 / 10 + 1e-6).all()
    assert covers.abs().max() <= 1
    assert not torch.equal(covers[0], covers[1])  # each image its own noise
    assert difference.mean() > 0.02  # uniform in [-1/size, 1/size]: mean |noise| is half of that


def test_covers_differ_from_the_trigger_and_are_deterministic_per_generator():
    attack = backdoor("wanet")
    x = images(n=4)
    x[1] = x[0]
    covers = attack.cover(x, gen(3))
    assert not torch.equal(covers[0], covers[1])
    assert (covers != attack.apply(x, gen(3))).float().mean() > 0.3
    assert torch.equal(covers, attack.cover(x, gen(3)))
    assert not torch.equal(covers, attack.cover(x, gen(4)))


# ---------------------------------------------------------------- planting

def test_plant_relabels_poisons_and_keeps_cover_labels():
    labels = torch.arange(4).repeat(10)  # 40 images, 4 classes
    x = images(n=40, shape=(1, 8, 8))
    attack = backdoor("wanet")
    planted = plant(x, labels, attack, Targeting("all_to_one", (0,)), Dose(rate=0.1), 4, gen())
    poisons, covers = planted.is_poison, planted.is_cover
    assert int(poisons.sum()) == 4 and int(covers.sum()) == 8  # 2 covers per poison
    assert not (poisons & covers).any()
    assert (labels[poisons] != 0).all() and (planted.labels[poisons] == 0).all()
    assert torch.equal(planted.labels[~poisons], labels[~poisons])
    assert torch.equal(planted.images[poisons], attack.apply(x[poisons], gen()))
    assert not torch.equal(planted.images[covers], attack.apply(x[covers], gen()))
    assert (planted.images[covers] != x[covers]).any()
    clean = ~(poisons | covers)
    assert torch.equal(planted.images[clean], x[clean])


def test_plant_cover_ratio_of_the_dose_overrides_the_attacks():
    labels = torch.arange(4).repeat(10)
    x = images(n=40, shape=(1, 8, 8))
    targeting = Targeting("all_to_one", (0,))
    none = plant(x, labels, backdoor("wanet"), targeting, Dose(rate=0.1, cover_ratio=0), 4, gen())
    assert int(none.is_cover.sum()) == 0
    one = plant(x, labels, backdoor("wanet"), targeting, Dose(count=5, rate=None, cover_ratio=1), 4, gen())
    assert int(one.is_poison.sum()) == 5 and int(one.is_cover.sum()) == 5
