"""The CLI end to end, as a real process, through the Prefect ingest flow (against the
session's test server), with good and bad input."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import random_samples, tree_digest
from formats import make_imagefolder
from robustdata.data.shards import encode_png, write_shard
from robustdata.io import write_json_atomic


@pytest.fixture(autouse=True)
def server_url(prefect_server):
    global API_URL
    API_URL = prefect_server


def invoke(*args):
    env = {**os.environ, "PREFECT_API_URL": API_URL, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "robustdata", *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=300)
    result.exit_code, result.output = result.returncode, result.stdout
    return result


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("ingest", "card", "verify"):
        assert command in result.output
    assert "--source" in invoke("ingest", "--help").output


def test_ingest_imagefolder_then_card_and_verify(tmp_path):
    make_imagefolder(tmp_path / "src", splits=["train", "test"], per_class=4)
    out = tmp_path / "out"
    result = invoke("ingest", "--source", f"imagefolder:{tmp_path / 'src'}", "--out", out, "--shard-size", 3)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "test", "train"]
    assert "cat" in result.output and "8 samples" in result.output
    assert invoke("card", out).exit_code == 0
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and verified.output.count("ok") == 2
    shard = out / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    tampered = invoke("verify", out)
    assert tampered.exit_code == 3 and str(shard) in tampered.stderr


def test_params_file_and_unknown_keys(tmp_path):
    make_imagefolder(tmp_path / "src")
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  source: imagefolder:{tmp_path / 'src'}\n  out: {tmp_path / 'o'}\n  shard_size: 2\n")
    assert invoke("ingest", "--params", params).exit_code == 0
    assert len(list((tmp_path / "o" / "train").glob("shard-*.tar"))) == 3
    params.write_text("ingest:\n  shard_sise: 2\n")
    result = invoke("ingest", "--params", params)
    assert result.exit_code == 2 and "shard_sise" in result.stderr


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


PNG = encode_png(np.zeros((4, 4, 1), np.uint8))


def truncated(d):
    write_shard(d / "shard-000000.tar", random_samples(30, shape=(16, 16, 1)))
    data = (d / "shard-000000.tar").read_bytes()
    (d / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    return "shards:{d}/*.tar", "shard-000000.tar", "after key 's00"


def not_an_image(d):
    write_tar(d / "a.tar", {"k1.png": PNG, "k1.cls": b"0", "k2.png": b"GIF89a...", "k2.cls": b"1"})
    return "shards:{d}/*.tar", "a.tar", "key 'k2'"


def label_outside_classes(d):
    write_shard(d / "a.tar", random_samples(6, shape=(4, 4, 1), num_classes=6))
    write_json_atomic(d / "card.json", {"classes": ["a", "b", "c"]})
    return "shards:{d}/*.tar", "a.tar", "key 's0003'"


def duplicate_keys(d):
    write_shard(d / "a.tar", random_samples(3, shape=(4, 4, 1)))
    write_shard(d / "b.tar", random_samples(3, shape=(4, 4, 1)))
    return "shards:{d}/*.tar", "b.tar", "key 's0000'"


def pickle_member(d):
    write_tar(d / "a.tar", {"k1.png": PNG, "k1.cls": b"0", "k1.pyd": b"\x80\x04K\x01."})
    return "shards:{d}/*.tar", "a.tar", "never unpickles"


def empty_imagefolder(d):
    return "imagefolder:{d}", str(d), "no class folders"


def empty_shard_glob(d):
    return "shards:{d}/*.tar", "*.tar", "no shard files match"


def unreadable_image(d):
    make_imagefolder(d)
    (d / "dog" / "img9.png").symlink_to(d / "missing.png")
    return "imagefolder:{d}", "img9.png", "key 'dog/img9.png'"


def corrupt_image_file(d):
    make_imagefolder(d)
    (d / "cat" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    return "imagefolder:{d}", "img1.png", "key 'cat/img1.png'"


@pytest.mark.parametrize("case", [truncated, not_an_image, label_outside_classes, duplicate_keys, pickle_member,
                                  empty_imagefolder, empty_shard_glob, unreadable_image, corrupt_image_file])
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    spec, file_part, key_part = case(src)
    out = tmp_path / "out"
    result = invoke("ingest", "--source", spec.format(d=src), "--out", out)
    assert result.exit_code == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert file_part in error_lines[0] and key_part in error_lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp leftovers


def test_failed_rebuild_keeps_previous_output(tmp_path):
    make_imagefolder(tmp_path / "src")
    out = tmp_path / "out"
    assert invoke("ingest", "--source", f"imagefolder:{tmp_path / 'src'}", "--out", out).exit_code == 0
    before = tree_digest(out)
    (tmp_path / "src" / "cat" / "img0.png").write_bytes(b"not an image")
    assert invoke("ingest", "--source", f"imagefolder:{tmp_path / 'src'}", "--out", out).exit_code == 2
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
