import io
import tarfile

import numpy as np
import pytest

from conftest import random_samples
from robustdata.data.shards import (
    Sample, decode_image, encode_png, iter_shard, iter_shards, quantize, validate_key, write_shard, write_shards,
)
from robustdata.errors import DataError


def write_raw_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_png_roundtrip_is_lossless_for_gray_and_rgb():
    rng = np.random.default_rng(1)
    for shape in [(5, 7, 1), (4, 6, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(decode_image(encode_png(image)), image)


def test_quantize_rounds_and_refuses_nan():
    assert quantize(np.array([0.0, 0.5, 1.0, 1.2, -0.1])).tolist() == [0, 128, 255, 255, 0]
    with pytest.raises(ValueError):
        quantize(np.array([np.nan]))


def test_shards_roundtrip_and_split(tmp_path):
    samples = random_samples(10)
    rows = write_shards(samples, tmp_path, shard_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [r["shard"] for r in rows].count("shard-000002.tar") == 2
    read = list(iter_shards(sorted(tmp_path.glob("*.tar"))))
    assert [s.key for s in read] == [s.key for s in samples]
    for a, b in zip(read, samples):
        assert np.array_equal(a.image, b.image) and a.label == b.label and a.info == b.info


def test_shard_bytes_do_not_depend_on_time(tmp_path, monkeypatch):
    import time

    write_shard(tmp_path / "a.tar", random_samples(3))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400 * 365)
    write_shard(tmp_path / "b.tar", random_samples(3))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


@pytest.mark.parametrize("member", ["pyd", "pickle", "pth"])
def test_pickle_member_is_refused(tmp_path, member):
    import pickle

    path = tmp_path / "shard-000000.tar"
    write_raw_tar(path, {"k1.png": encode_png(np.zeros((2, 2, 1), np.uint8)), "k1.cls": b"0",
                         f"k1.{member}": pickle.dumps({"a": 1})})
    with pytest.raises(DataError, match="refusing pickle-type member") as info:
        list(iter_shard(path))
    assert info.value.path == str(path) and info.value.key == "k1"


def test_unknown_member_and_dotted_key_are_refused(tmp_path):
    path = tmp_path / "s.tar"
    write_raw_tar(path, {"a.b.png": encode_png(np.zeros((2, 2, 1), np.uint8)), "a.b.cls": b"0"})
    with pytest.raises(DataError, match="not one of"):
        list(iter_shard(path))


def test_truncated_tar_names_file_and_last_key(tmp_path):
    write_shard(tmp_path / "full.tar", random_samples(20, shape=(16, 16, 3)))
    data = (tmp_path / "full.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match="corrupt or unreadable shard") as info:
        list(iter_shard(cut))
    assert info.value.path == str(cut) and "after key 's00" in str(info.value)


def test_member_that_is_not_an_image(tmp_path):
    path = tmp_path / "s.tar"
    write_raw_tar(path, {"k7.png": b"this is not a png", "k7.cls": b"1"})
    with pytest.raises(DataError, match="not a readable image") as info:
        list(iter_shard(path))
    assert info.value.key == "k7"


def test_bad_label_and_json(tmp_path):
    png = encode_png(np.zeros((2, 2, 1), np.uint8))
    write_raw_tar(tmp_path / "a.tar", {"k.png": png, "k.cls": b"three"})
    with pytest.raises(DataError, match="not an integer label"):
        list(iter_shard(tmp_path / "a.tar"))
    write_raw_tar(tmp_path / "b.tar", {"k.png": png, "k.cls": b"1", "k.json": b"\xff\xfe{"})
    with pytest.raises(DataError, match="UTF-8 JSON"):
        list(iter_shard(tmp_path / "b.tar"))


def test_duplicate_keys_across_shards(tmp_path):
    write_shard(tmp_path / "a.tar", random_samples(2))
    write_shard(tmp_path / "b.tar", random_samples(2))
    with pytest.raises(DataError, match="duplicate key") as info:
        list(iter_shards([tmp_path / "a.tar", tmp_path / "b.tar"]))
    assert info.value.path.endswith("b.tar") and info.value.key == "s0000"


@pytest.mark.parametrize("key", ["a.b", "/abs", "../up", "a/../b", "", "sp ace"])
def test_invalid_keys(key):
    with pytest.raises(DataError):
        validate_key(key)


def test_sample_without_label_or_image(tmp_path):
    write_raw_tar(tmp_path / "a.tar", {"k.png": encode_png(np.zeros((2, 2, 1), np.uint8))})
    with pytest.raises(DataError, match="no cls"):
        list(iter_shard(tmp_path / "a.tar"))
    write_raw_tar(tmp_path / "b.tar", {"k.cls": b"1", "k.txt": b"hello"})
    with pytest.raises(DataError, match="exactly one image"):
        list(iter_shard(tmp_path / "b.tar"))


def test_tar_cut_at_a_member_boundary_is_detected(tmp_path):
    """tarfile reads such a file as a valid, shorter archive; the end marker check does not."""
    write_shard(tmp_path / "full.tar", random_samples(6))
    with tarfile.open(tmp_path / "full.tar") as tar:
        offset = [m.offset for m in tar.getmembers() if m.name == "s0004.cls"][0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "full.tar").read_bytes()[:offset])
    with pytest.raises(DataError, match="truncated shard") as info:
        list(iter_shard(cut))
    assert "after key 's0002'" in str(info.value)


@pytest.mark.parametrize("member", ["link", "absolute", "parent"])
def test_links_and_paths_outside_the_shard_are_refused(tmp_path, member):
    """webdataset silently skips non-regular members: a shard of symlinks would read as empty."""
    path = tmp_path / "s.tar"
    png = encode_png(np.zeros((2, 2, 1), np.uint8))
    with tarfile.open(path, "w") as tar:
        for name, data in (("k0.png", png), ("k0.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if member == "link":
            info = tarfile.TarInfo("k1.png")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            name = "/etc/k1.png" if member == "absolute" else "../k1.png"
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    with pytest.raises(DataError, match="is a link|outside the shard") as caught:
        list(iter_shard(path))
    assert caught.value.path == str(path)
