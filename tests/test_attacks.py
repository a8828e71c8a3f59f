"""PGD invariants on a planted problem: a linear model whose decision depends on known pixels."""

import pytest
import torch
from torch import nn

from robustdata.train.attacks import L2, Linf, PGDConfig, evaluating, fgsm_rs, pgd, pgd_attack, threat_model
from robustdata.errors import RobustDataError
from robustdata.train.models import SmallCNN, build_model, representation


def planted_model_and_data(n=64, seed=0):
    """Label = whether the mean of the left half exceeds the right half's; a linear model knows it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 8, 8), generator=g)
    w = torch.zeros(2, 1, 8, 8)
    w[1, :, :, :4], w[1, :, :, 4:] = 1.0, -1.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w.flatten(1) * 4)
    y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("name,eps,step", [("linf", 0.1, 0.02), ("l2", 1.0, 0.25)])
def test_pgd_stays_in_ball_and_image_range(name, eps, step):
    model, x, y = planted_model_and_data()
    config = PGDConfig(threat_model(name, eps), steps=20, step_size=step, restarts=2)
    x_adv = pgd_attack(model, x, y, config, generator=torch.Generator().manual_seed(1))
    delta = (x_adv - x).flatten(1)
    norm = delta.abs().max(1).values if name == "linf" else delta.norm(dim=1)
    assert (norm <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        robust = (model(x_adv).argmax(1) == y).float().mean()
    assert robust <= clean and robust < 0.9  # the attack really works on this model


def test_random_start_is_inside_the_ball():
    x = torch.rand(32, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert (Linf(0.3).random_start(x, g).abs() <= 0.3).all()
    assert (L2(0.5).random_start(x, g).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()


def test_pgd_matches_the_analytic_optimum_of_a_linear_objective():
    """max w.x over the Linf ball is x + eps*sign(w) (clipped to [0, 1])."""
    w = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    x = torch.full((4, 1, 6, 6), 0.5)
    x_adv = pgd(lambda z: (z * w).flatten(1).sum(1), x, PGDConfig(Linf(0.2), steps=5, step_size=0.1))
    assert torch.allclose(x_adv, x + 0.2 * w.sign())


def test_attack_restores_train_mode_and_is_seeded():
    model = SmallCNN()
    model.train()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    config = PGDConfig(Linf(0.3), steps=3, step_size=0.1)
    a = pgd_attack(model, x, y, config, generator=torch.Generator().manual_seed(5))
    assert model.training
    with evaluating(model):
        assert not model.training
    assert model.training
    b = pgd_attack(model, x, y, config, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_targeted_attack_reaches_the_target():
    model, x, y = planted_model_and_data()
    target = 1 - y
    x_adv = pgd_attack(model, x, target, PGDConfig(Linf(0.5), steps=30, step_size=0.05), targeted=True,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() > 0.95


def test_fgsm_rs_within_eps():
    model, x, y = planted_model_and_data()
    x_adv = fgsm_rs(model, x, y, eps=0.3, alpha=0.375, generator=torch.Generator().manual_seed(0))
    assert ((x_adv - x).abs() <= 0.3 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_unknown_threat_model_lists_valid():
    with pytest.raises(RobustDataError, match="valid"):
        threat_model("l3", 0.1)


@pytest.mark.parametrize("arch,shape", [("small_cnn", (2, 1, 28, 28)), ("resnet18", (2, 3, 32, 32)),
                                        ("tv:resnet18", (2, 3, 64, 64))])
def test_models_expose_representation_layers(arch, shape):
    model = build_model(arch, num_classes=7, in_channels=shape[1], image_size=shape[2]).eval()
    x = torch.rand(shape)
    assert model(x).shape == (2, 7)
    penultimate = representation(model, x, "penultimate")
    assert penultimate.shape[0] == 2 and penultimate.dim() == 2
    # the penultimate layer really feeds the classifier: the head applied to it gives the logits
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.allclose(head(penultimate), model(x), atol=1e-5)
    last_conv = representation(model, x, "last_conv")
    assert last_conv.shape[0] == 2 and last_conv.shape[1] >= penultimate.shape[1]
    with pytest.raises(RobustDataError, match="no layer"):
        representation(model, x, "nope")
