"""load_params: a file laid over the defaults, a profile over the file, overrides over both; every error names
its key. The tests write their own small params files and profiles, so they check how values are combined
and validated, not which numbers params.yaml happens to hold."""

import pytest
import yaml
from pydantic import BaseModel

from robustdata.config import Params, load_params
from robustdata.errors import DataError, RobustDataError
from conftest import REPO_ROOT

DEFAULTS = Params()


def write(path, sections) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections) if isinstance(sections, dict) else sections)
    return str(path)


def test_params_yaml_matches_the_defaults():
    """params.yaml is the documented source of every knob; code defaults must not drift from it."""
    assert load_params(REPO_ROOT / "params.yaml") == DEFAULTS


def test_no_file_and_an_empty_file_are_the_defaults(tmp_path):
    assert load_params() == DEFAULTS
    assert load_params(write(tmp_path / "empty.yaml", "")) == DEFAULTS
    assert load_params(write(tmp_path / "comments.yaml", "# nothing set\n")) == DEFAULTS


def test_overrides_beat_the_file_and_none_keeps_the_files_value(tmp_path):
    path = write(tmp_path / "p.yaml", {"train_standard": {"epochs": 9, "lr": 0.02, "batch_size": 32}})
    params = load_params(path, train_standard={"epochs": 7, "lr": None}, audit={"kappa": 2.5})
    assert params.train_standard.epochs == 7           # the override wins over the file
    assert params.train_standard.lr == 0.02            # None: the CLI option was not given, the file's value stays
    assert params.train_standard.batch_size == 32      # keys the override does not name keep the file's value
    assert params.audit.kappa == 2.5                   # a section absent from the file takes overrides too
    assert params.audit.model_copy(update={"kappa": DEFAULTS.audit.kappa}) == DEFAULTS.audit
    assert params.train_robust == DEFAULTS.train_robust  # other sections untouched


def test_a_partial_section_keeps_its_own_sections_defaults(tmp_path):
    """`build_rand: {limit: 100}` stays a D_rand recipe, not BuildParams' field defaults."""
    path = write(tmp_path / "p.yaml", "build_rand:\n  limit: 100\ntrain_robust:\n  adversarial:\n    eps: 0.1\n")
    params = load_params(path)
    assert params.build_rand.limit == 100
    assert params.build_rand.model_copy(update={"limit": DEFAULTS.build_rand.limit}) == DEFAULTS.build_rand
    assert params.train_robust.adversarial.eps == 0.1
    assert params.train_robust.adversarial.model_copy(update={"eps": DEFAULTS.train_robust.adversarial.eps}) == \
        DEFAULTS.train_robust.adversarial


def test_a_nested_override_keeps_the_sections_other_nested_keys(tmp_path):
    params = load_params(None, train_robust={"adversarial": {"eps": 0.1}})
    assert params.train_robust.adversarial.eps == 0.1
    assert params.train_robust.adversarial.model_copy(update={"eps": DEFAULTS.train_robust.adversarial.eps}) == \
        DEFAULTS.train_robust.adversarial


def test_a_profile_is_laid_over_the_file_key_by_key_and_overrides_over_both(tmp_path):
    path = write(tmp_path / "p.yaml", {
        "train_robust": {"epochs": 2, "batch_size": 64, "adversarial": {"method": "pgd", "steps": 3, "eps": 0.2}},
        "evaluate": {"attacks": [{"eps": 0.1}, {"eps": 0.2}], "limit": 50}})
    write(tmp_path / "profiles" / "big.yaml", {
        "train_robust": {"epochs": 20, "limit": None, "adversarial": {"steps": 40}},
        "evaluate": {"attacks": [{"threat": "l2", "eps": 1.0}]}})
    params = load_params(path, profile="big")
    robust = params.train_robust
    assert (robust.epochs, robust.limit) == (20, None)          # the profile's values, null included
    assert robust.batch_size == 64                               # the file's value where the profile is silent
    assert (robust.adversarial.steps, robust.adversarial.eps, robust.adversarial.method) == (40, 0.2, "pgd")
    assert robust.adversarial.alpha == DEFAULTS.train_robust.adversarial.alpha  # nested: merged key by key
    assert [(a.threat, a.eps) for a in params.evaluate.attacks] == [("l2", 1.0)]  # a list is replaced whole
    assert params.evaluate.limit == 50
    # overrides come last; a profile given as a path works like one found by name
    again = load_params(path, profile=str(tmp_path / "profiles" / "big.yaml"), train_robust={"epochs": 1})
    assert again.train_robust.epochs == 1 and again.train_robust.adversarial.steps == 40
    assert load_params(path, profile=str(tmp_path / "profiles" / "big.yaml")) == params


def assert_laid_over(merged: BaseModel, base: BaseModel, layer: dict, where: str) -> None:
    """`merged` is `base` with `layer` (a YAML mapping) laid over it: mappings key by key, anything else whole."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(getattr(base, key), BaseModel):
            assert_laid_over(getattr(merged, key), getattr(base, key), value, f"{where}.{key}")
        else:
            expected = getattr(type(base).model_validate({**base.model_dump(), key: value}), key)
            assert getattr(merged, key) == expected, f"{where}.{key}"
    for key in set(type(base).model_fields) - set(layer):
        assert getattr(merged, key) == getattr(base, key), f"{where}.{key} is not in the profile but changed"


def test_the_full_profile_is_params_yaml_with_the_profiles_keys_laid_over_it():
    """Whatever the two files hold: every key profiles/full.yaml sets has the profile's value, every other key
    keeps params.yaml's."""
    base, full = load_params(REPO_ROOT / "params.yaml"), load_params(REPO_ROOT / "params.yaml", profile="full")
    profile = yaml.safe_load((REPO_ROOT / "profiles" / "full.yaml").read_text())
    assert profile, "profiles/full.yaml sets nothing"
    assert_laid_over(full, base, profile, "params")
    assert full != base


def test_an_unknown_profile_lists_the_known_ones(tmp_path):
    path = write(tmp_path / "p.yaml", {})
    write(tmp_path / "profiles" / "big.yaml", {})
    write(tmp_path / "profiles" / "tiny.yaml", {})
    with pytest.raises(RobustDataError, match=r"known profiles: \['big', 'tiny'\]"):
        load_params(path, profile="nope")


@pytest.mark.parametrize("text, key", [
    ("train_robust:\n  adversarial:\n    epss: 0.3\n", "train_robust.adversarial.epss"),     # a typo, nested
    ("train_standard:\n  epochs: 0\n", "train_standard.epochs"),                           # out of range
    ("audit:\n  eps: 1.5\n", "audit.eps"),
    ("evaluate:\n  attacks: [{threat: l3}]\n", "evaluate.attacks.0.threat"),               # inside a list
    ("build_det:\n  schedule: fast\n", "build_det.schedule"),
    ("ingestt:\n  limit: 3\n", "ingestt"),                                                  # an unknown section
])
def test_a_validation_error_names_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path / "p.yaml", text)
    with pytest.raises(RobustDataError) as caught:
        load_params(path)
    assert f"{key}:" in str(caught.value) and str(path) in str(caught.value)


def test_every_bad_key_is_named_at_once_and_overrides_are_validated_too(tmp_path):
    path = write(tmp_path / "p.yaml", {"train_standard": {"epochs": -1, "optimizer": "lion"}})
    with pytest.raises(RobustDataError) as caught:
        load_params(path)
    assert "train_standard.epochs:" in str(caught.value) and "train_standard.optimizer:" in str(caught.value)
    with pytest.raises(RobustDataError, match=r"train_standard\.lrr"):
        load_params(None, train_standard={"lrr": 0.1})
    with pytest.raises(RobustDataError, match=r"build_rand\.steps"):
        load_params(None, build_rand={"steps": 0})


def test_unreadable_params_files_are_data_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="not found") as caught:
        load_params(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(caught.value)
    with pytest.raises(DataError, match="not valid YAML"):
        load_params(write(tmp_path / "broken.yaml", "train_standard: [epochs: 3\n"))
    with pytest.raises(DataError, match="mapping of sections"):
        load_params(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
