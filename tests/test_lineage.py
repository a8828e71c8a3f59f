"""The user's files, named all the way down: an ImageFolder set ingested, poisoned, audited and filtered
(through the Python API's flows) keeps each sample's first origin (its file's path) beside its parent key, and the audit's
flagged list names the files."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq

from robustdata import api

from formats import make_imagefolder

CLASSES = ("cat", "dog", "eel")


def manifest(path):
    return pq.read_table(path / "manifest.parquet").to_pylist()


def test_first_origins_survive_poisoning_auditing_and_filtering(tmp_path):
    files = make_imagefolder(tmp_path / "images", classes=CLASSES, per_class=40, size=(28, 28),
                             splits=["train", "val", "test"])
    api.ingest(source=f"imagefolder:{tmp_path / 'images'}", out=tmp_path / "data", image_mode="L")
    api.plant_poisons(data=tmp_path / "data", out=tmp_path / "poisoned", attack="badnets", target=0, rate=0.1)
    api.fit("suspect", data=tmp_path / "poisoned", out=tmp_path / "suspect", epochs=1, batch_size=32)
    # eps given, removed from every class: flags in each, whatever the tiny model learnt (filter_rank 4: the
    # classes of 40 are large enough to audit)
    api.audit(model=tmp_path / "suspect", data=tmp_path / "poisoned", out=tmp_path / "filtered",
              report=tmp_path / "report", eps=0.1, eps_scope="all", filter_rank=4, rank=8)

    ingested = {row["key"]: row["origin_key"] for row in manifest(tmp_path / "data" / "train")}
    assert set(ingested.values()) == {path for path in files if path.startswith("train/")}  # the files' paths

    poisoned = manifest(tmp_path / "poisoned" / "train")
    assert sum(row["is_poison"] for row in poisoned) == 12  # 10% of 120
    for row in poisoned:  # the parent's key, and the user's file
        assert row["origin_key"] == row["key"] and row["first_origin"] == ingested[row["key"]]

    with open(tmp_path / "report" / "flagged.csv", newline="") as handle:
        flagged = list(csv.DictReader(handle))
    assert len(flagged) >= 3 * 6  # eps 0.1 in every class: 1.5 x 0.1 x 40 each
    scores = [float(row["score"]) for row in flagged]
    assert scores == sorted(scores, reverse=True)
    for row in flagged:
        assert row["first_origin"] == ingested[row["key"]]
        assert row["first_origin"].split("/")[-2] in CLASSES and row["first_origin"].endswith(".png")

    kept = manifest(tmp_path / "filtered" / "train")
    assert len(kept) == 120 - len(flagged)
    assert {row["key"] for row in kept}.isdisjoint(row["key"] for row in flagged)
    for row in kept:
        assert row["origin_key"] == row["key"] and row["first_origin"] == ingested[row["key"]]
    audited = pq.read_table(tmp_path / "report" / "scores.parquet").to_pylist()
    assert all(row["first_origin"] == ingested[row["key"]] for row in audited)

    # the same audit streamed shard by shard (bounded memory): the same verdicts and budgets, the same lineage
    api.audit(model=tmp_path / "suspect", data=tmp_path / "poisoned", out=tmp_path / "filtered_streamed",
              report=tmp_path / "report_streamed", eps=0.1, eps_scope="all", filter_rank=4, rank=8, stream=True)
    in_memory, streamed = (json.loads((tmp_path / name / "summary.json").read_text())
                           for name in ("report", "report_streamed"))
    assert streamed["verdict"] == in_memory["verdict"]
    assert [(c["verdict"], c["budget"], c["flagged"]) for c in streamed["classes"]] == \
        [(c["verdict"], c["budget"], c["flagged"]) for c in in_memory["classes"]]
    with open(tmp_path / "report_streamed" / "flagged.csv", newline="") as handle:
        flagged_streamed = list(csv.DictReader(handle))
    assert all(row["first_origin"] == ingested[row["key"]] for row in flagged_streamed)
    kept_streamed = manifest(tmp_path / "filtered_streamed" / "train")
    assert {row["key"] for row in kept_streamed} == set(ingested) - {row["key"] for row in flagged_streamed}
    assert all(row["first_origin"] == ingested[row["key"]] for row in kept_streamed)
    assert (tmp_path / "report_streamed" / "report.html").exists()
    assert not list((tmp_path / "report_streamed" / "figures").glob("suspicious_*.png"))  # no images held
