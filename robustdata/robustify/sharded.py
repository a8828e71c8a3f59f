"""Resumable, shard-parallel dataset builds.

A build of N samples is cut into shards of `shard_size`. Each shard is a pure
function of the build's inputs, its params and its index: its random stream is
seeded from (seed, shard index), never from what ran before it. So shards can
be built in any order by any number of workers, and a killed build continues by
building only the shards it lacks, ending byte-identical to one that never
stopped.

While it runs, a build lives in `<out>.partial/`:

    plan.json                  the fingerprint of what is being built (params, input hashes, code)
    train/shard-000000.tar     finished shards, each written atomically ...
    rows/shard-000000.json     ... then its manifest rows (with the tar's sha256), also atomically

A shard counts as finished only when its rows file exists and the tar's sha256
matches the one recorded there, so a shard cut off mid-write is built again. A
different fingerprint discards the partial build. When every shard is there,
the manifest and card are written and the directory is renamed to `<out>`: an
`<out>` directory is always a complete dataset.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from robustdata.data.cards import write_dataset_card
from robustdata.data.derived import FIRST_ORIGIN_FIELD
from robustdata.data.manifest import MANIFEST_NAME, manifest_schema, write_manifest
from robustdata.data.shards import SHARD_NAME, Sample, write_shard
from robustdata.io import dumps_json, read_json, replace_directory, sha256_file, write_json_atomic

SPLIT = "train"
PLAN_NAME = "plan.json"

# Lineage of built samples, beyond the base manifest (origin_key, source_label).
BUILD_FIELDS = [
    FIRST_ORIGIN_FIELD,                       # the user's file the sample descends from (data.manifest)
    pa.field("kind", pa.string()),            # robust | nonrobust | rand | det
    pa.field("start_key", pa.string()),       # robust/nonrobust: the image the inversion started from
    pa.field("target_label", pa.int32()),     # rand/det: the label the image was pushed toward (= its label)
    pa.field("final_distance", pa.float64()),  # robust/nonrobust: ||g(x_r) - g(x)|| / ||g(x)|| reached
    pa.field("final_loss", pa.float64()),      # rand/det: cross-entropy toward the target reached
]
BUILD_SCHEMA = manifest_schema(BUILD_FIELDS)


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard `index`'s random stream: independent of every other shard's."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class BuildPlan:
    out: Path
    num_samples: int
    shard_size: int
    fingerprint: dict[str, Any]  # equal fingerprints must give equal bytes

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.num_samples))

    def shard_path(self, index: int) -> Path:
        return self.work / SPLIT / SHARD_NAME.format(index=index)

    def rows_path(self, index: int) -> Path:
        return self.work / "rows" / f"{SHARD_NAME.format(index=index)}.json"


def is_finished(plan: BuildPlan, index: int) -> bool:
    rows_path, shard_path = plan.rows_path(index), plan.shard_path(index)
    if not rows_path.exists() or not shard_path.exists():
        return False
    record = read_json(rows_path)
    return record.get("sha256") == sha256_file(shard_path)


def prepare(plan: BuildPlan) -> list[int]:
    """Create or reuse the partial build; return the indices of the shards still to build."""
    plan_path = plan.work / PLAN_NAME
    if plan.work.exists() and (not plan_path.exists() or read_json(plan_path) != plan.fingerprint):
        shutil.rmtree(plan.work)  # built from other inputs or params: nothing in it can be reused
    (plan.work / SPLIT).mkdir(parents=True, exist_ok=True)
    (plan.work / "rows").mkdir(exist_ok=True)
    if not plan_path.exists():
        # round-trip through JSON so the comparison above sees what a later run reads back
        write_json_atomic(plan_path, plan.fingerprint)
        if read_json(plan_path) != plan.fingerprint:
            raise ValueError(f"build fingerprint does not survive JSON: {dumps_json(plan.fingerprint)}")
    return [i for i in range(plan.num_shards) if not is_finished(plan, i)]


def write_built_shard(plan: BuildPlan, index: int, samples: list[Sample]) -> list[dict[str, Any]]:
    """The shard's tar, then its rows (with the tar's hash): the rows file marks it finished."""
    expected = list(plan.shard_range(index))
    if len(samples) != len(expected):
        raise ValueError(f"shard {index} should hold {len(expected)} samples, got {len(samples)}")
    path = plan.shard_path(index)
    rows = write_shard(path, samples)
    write_json_atomic(plan.rows_path(index), {"sha256": sha256_file(path), "rows": rows})
    return rows


def finish(plan: BuildPlan, card_fields: dict[str, Any], extra_dirs: dict[str, Path] | None = None
           ) -> dict[str, Any]:
    """Write the manifest and the card (robustdata.data.cards.dataset_card's keyword fields but `split`),
    copy `extra_dirs` (name -> source directory, e.g. the source's val split), and move the build to
    `plan.out`."""
    missing = [i for i in range(plan.num_shards) if not is_finished(plan, i)]
    if missing:
        raise ValueError(f"build {plan.out} is missing shards {missing}")
    rows = [row for i in range(plan.num_shards) for row in read_json(plan.rows_path(i))["rows"]]
    split_dir = plan.work / SPLIT
    manifest_sha = write_manifest(split_dir / MANIFEST_NAME, rows, BUILD_SCHEMA)
    card = write_dataset_card(split_dir, rows, manifest_sha, split=SPLIT, **card_fields)
    shutil.rmtree(plan.work / "rows")
    (plan.work / PLAN_NAME).unlink()
    for name, source in (extra_dirs or {}).items():
        shutil.copytree(source, plan.work / name)
    replace_directory(plan.work, plan.out)
    return card
