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
