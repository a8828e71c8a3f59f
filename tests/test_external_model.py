"""The user's own classifier: factory + state_dict, TorchScript, normalisation, and the errors that name the file.

Expected features are computed by hand from the eager torchvision ResNet-18 (its forward, step by step),
not through robustdata's hooks, so a wrong layer or a skipped normalisation shows up as a mismatch.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
import torchvision
from torch import nn

from robustdata.audit.features import extract_features
from robustdata.errors import DataError, RobustDataError
from robustdata.train.external import ExternalClassifier, load_external_model, parse_spec

SPEC = "factory:torchvision.models:resnet18?num_classes=10"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: this module never imports prefect."""


@pytest.fixture(scope="module")
def eager() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # random init: weights=None, no download
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a skipped buffer would change the outputs
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def weights(eager, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(eager.state_dict(), path)
    return path


def trunk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's forward up to layer4, by hand: (N, 512, H/32, W/32)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@torch.no_grad()
def expected(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    x = images.float() / 255.0
    features = trunk(model, x)
    if layer == "penultimate":
        features = model.avgpool(features)
    return features.flatten(1)


def test_factory_state_dict_round_trip(eager, images, weights):
    model, sidecar = load_external_model(SPEC, "cpu", state_dict=weights)
    x = images.float() / 255.0
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))
    assert not model.training
    for layer in ("penultimate", "layer4"):
        assert torch.equal(extract_features(model, images, layer), expected(eager, images, layer)), layer
    assert sidecar["arch"] == "external:torchvision.models:resnet18"
    assert sidecar["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar["classes"] is None and sidecar["kwargs"] == {"num_classes": 10}


@pytest.fixture(scope="module", params=["script", "trace"])
def torchscript_file(request, eager, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / f"{request.param}.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; users still ship it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(eager) if request.param == "script" else torch.jit.trace(eager, images[:2] / 255.0)
        torch.jit.save(scripted, path)
    return path


def test_torchscript_layers_match_eager(eager, images, torchscript_file):
    model, sidecar = load_external_model(f"torchscript:{torchscript_file}", "cpu")
    assert isinstance(model, ExternalClassifier) and sidecar["arch"] == "torchscript"
    assert sidecar["weights_sha256"] == hashlib.sha256(torchscript_file.read_bytes()).hexdigest()
    x = images.float() / 255.0
    with torch.no_grad():
        assert torch.allclose(model(x), eager(x), atol=1e-5, rtol=1e-5)
    for layer in ("penultimate", "layer4", "last_conv"):
        want = expected(eager, images, "layer4" if layer == "last_conv" else layer)
        got = extract_features(model, images, layer)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5), layer
    # a nested layer, read in its own pass: layer3's second block's second convolution
    block = eager.layer3[1]
    with torch.no_grad():
        h = eager.layer3[0](eager.layer2(eager.layer1(eager.maxpool(eager.relu(eager.bn1(eager.conv1(x)))))))
        want = block.conv2(block.relu(block.bn1(block.conv1(h)))).flatten(1)
    assert torch.allclose(extract_features(model, images, "layer3.1.conv2"), want, atol=1e-5, rtol=1e-5)


def test_torchscript_shared_module_refused(images, torchscript_file):
    """torchvision's BasicBlock calls its one `relu` twice: which call a hook sees is ambiguous in the graph."""
    model, _ = load_external_model(f"torchscript:{torchscript_file}", "cpu")
    with pytest.raises(RobustDataError, match="'layer4.1.relu' returns 2 tensors"):
        extract_features(model, images, "layer4.1.relu")


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_state_dict_key_mismatch_names_file_and_key(eager, tmp_path, change):
    state = dict(eager.state_dict())
    if change == "extra":
        state["head.planted_key"] = torch.zeros(1)
        key = "head.planted_key"
    else:
        key = "layer2.1.bn2.running_var"
        del state[key]
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(DataError) as caught:
        load_external_model(SPEC, "cpu", state_dict=path)
    message = str(caught.value)
    assert str(path) in message and key in message
    assert ("unexpected keys [head.planted_key]" if change == "extra" else "missing keys [layer2.1.bn2.running_var]") \
        in message


UNPICKLED = []


class Planted:
    """Unpickling it would record itself: the refusal must come before any of its code runs."""

    def __setstate__(self, state):
        UNPICKLED.append(state)


def test_pickled_object_refused_without_running_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"fc.weight": torch.zeros(10, 512), "trainer": Planted()}, path)
    with pytest.raises(DataError, match="never unpickles arbitrary objects") as caught:
        load_external_model(SPEC, "cpu", state_dict=path)
    assert str(path) in str(caught.value) and "torch.save(model.state_dict(), path)" in str(caught.value)
    assert UNPICKLED == []


@pytest.mark.parametrize("spec, match", [
    ("factory:robustdata_no_such_pkg.models:net", r"tried `import robustdata_no_such_pkg.models`"),
    ("factory:torchvision.models:resnet81", r"torchvision.models has no attribute 'resnet81'.*'resnet18'"),
    ("factory:torchvision.models:resnet18?num_clases=10", r"rejected arguments \{'num_clases': 10\}.*signature"),
    ("onnx:/tmp/model.onnx", r"valid: 'torchscript:PATH' or 'factory:MODULE:ATTR"),
])
def test_bad_factory_specs(weights, spec, match):
    with pytest.raises(RobustDataError, match=match):
        load_external_model(spec, "cpu", state_dict=weights)


def test_bad_files_are_named(tmp_path, weights):
    missing = tmp_path / "absent.pt"
    with pytest.raises(DataError, match="no such TorchScript archive file") as caught:
        load_external_model(f"torchscript:{missing}", "cpu")
    assert str(missing) in str(caught.value)
    # a plain state_dict is a zip archive too, but not a TorchScript one
    with pytest.raises(DataError, match="not a TorchScript archive") as caught:
        load_external_model(f"torchscript:{weights}", "cpu")
    assert str(weights) in str(caught.value)
    with pytest.raises(DataError, match="no such state_dict file"):
        load_external_model(SPEC, "cpu", state_dict=missing)


def test_normalize_wrapper(eager, images, weights):
    model, sidecar = load_external_model(SPEC, "cpu", state_dict=weights, normalize=(MEAN, STD))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = images.float() / 255.0
    with torch.no_grad():
        assert torch.equal(model(x), eager((x - mean) / std))
        want = trunk(eager, (x - mean) / std)
    # layer names resolve against the user's model, not the wrapper
    assert torch.equal(extract_features(model, images, "layer4"), want.flatten(1))
    assert torch.equal(extract_features(model, images, "last_conv"), want.flatten(1))
    assert torch.equal(extract_features(model, images, "penultimate"), eager.avgpool(want).flatten(1))
    assert sidecar["normalize"] == [list(MEAN), list(STD)]
    with pytest.raises(RobustDataError, match="positive std"):
        load_external_model(SPEC, "cpu", state_dict=weights, normalize=(MEAN, (0.2, 0.0, 0.2)))


def test_parse_spec_reads_literals():
    spec = parse_spec("factory:pkg.nets:Zoo.make?num_classes=10&width=0.5&pretrained=False&name=wide&size=(32, 32)")
    assert (spec.module, spec.attr) == ("pkg.nets", "Zoo.make")
    assert spec.kwargs == {"num_classes": 10, "width": 0.5, "pretrained": False, "name": "wide", "size": (32, 32)}
    assert parse_spec("torchscript:/data/a:b?.pt").path.name == "a:b?.pt"


def test_factory_from_a_user_package_keeps_its_named_layers(tmp_path):
    """Any importable factory works; a model's own LAYERS (here robustdata's SmallCNN) stay readable when wrapped."""
    from robustdata.train.models import SmallCNN, representation

    torch.manual_seed(2)
    net = SmallCNN(num_classes=3, in_channels=1, image_size=8).eval()
    path = tmp_path / "small.pt"
    torch.save(net.state_dict(), path)
    spec = "factory:robustdata.train.models:SmallCNN?num_classes=3&in_channels=1&image_size=8"
    model, _ = load_external_model(spec, "cpu", state_dict=path, normalize=((0.5,), (0.2,)))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    x = (images.float() / 255.0 - 0.5) / 0.2
    with torch.no_grad():
        want = net.fc1(net.block2(net.block1(x)))  # SmallCNN.LAYERS["penultimate"] is fc1's output
        assert torch.equal(representation(net, x, "penultimate"), want)
    assert model.LAYERS["penultimate"] == "model.fc1"
    assert torch.equal(extract_features(model, images, "penultimate"), want)
