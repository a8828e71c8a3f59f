import pytest

from robustdata.config import Params, load_params
from robustdata.errors import RobustDataError
from conftest import REPO_ROOT


def test_params_yaml_matches_the_defaults():
    """params.yaml is the documented source of every knob; code defaults must not drift from it."""
    assert load_params(REPO_ROOT / "params.yaml") == Params()


def test_overrides_and_unknown_keys(tmp_path):
    params = load_params(REPO_ROOT / "params.yaml", train_standard={"epochs": 7, "lr": None})
    assert params.train_standard.epochs == 7 and params.train_standard.lr == Params().train_standard.lr
    bad = tmp_path / "p.yaml"
    bad.write_text("train_robust:\n  adversarial:\n    epss: 0.3\n")
    with pytest.raises(RobustDataError, match="train_robust.adversarial.epss"):
        load_params(bad)
    bad.write_text("evaluate:\n  attacks: [{threat: l3}]\n")
    with pytest.raises(RobustDataError, match="threat"):
        load_params(bad)


def test_full_profile_lays_the_benchmark_recipe_over_params_yaml():
    quick, full = load_params(REPO_ROOT / "params.yaml"), load_params(REPO_ROOT / "params.yaml", profile="full")
    assert (quick.train_robust.epochs, quick.train_robust.limit) == (6, 10000)
    assert (full.train_robust.epochs, full.train_robust.limit) == (15, None)
    assert full.build_robust.limit == 10000 and full.robustify_eval.seeds == [0, 1, 2]
    assert full.build_robust.relu_grad_beta == quick.build_robust.relu_grad_beta  # untouched keys stay
    with pytest.raises(RobustDataError, match="known profiles"):
        load_params(REPO_ROOT / "params.yaml", profile="nope")


def test_a_partial_section_keeps_its_own_sections_defaults(tmp_path):
    """`build_rand: {limit: 100}` stays a D_rand recipe, not BuildParams' field defaults."""
    path = tmp_path / "p.yaml"
    path.write_text("build_rand:\n  limit: 100\ntrain_robust:\n  adversarial:\n    eps: 0.1\n")
    params, defaults = load_params(path), Params()
    assert params.build_rand.limit == 100
    assert params.build_rand.model_copy(update={"limit": defaults.build_rand.limit}) == defaults.build_rand
    assert params.train_robust.adversarial.eps == 0.1
    assert params.train_robust.adversarial.steps == defaults.train_robust.adversarial.steps
