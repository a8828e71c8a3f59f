"""Atomic writes, hashing and code version.

Outputs are written to a temporary sibling and renamed into place, so a crash
never leaves a half-written file or directory that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from robustdata.version import __version__
from robustdata.errors import DataError

_CHUNK = 1 << 20


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give a normal file's mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, fixed indent) so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, dumps_json(obj).encode())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path`.

    On failure the temporary directory is removed and an existing `path` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing any existing `dst`."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def code_version(package_dir: Path | None = None) -> dict[str, str]:
    """The library version and a content hash of the data layer's source.

    A content hash (not a git commit) so that an artifact changes only when the
    code that built it changes, which keeps DVC's lock file stable across
    unrelated commits.
    """
    package_dir = package_dir or Path(__file__).resolve().parent / "data"
    digest = hashlib.sha256()
    for source in sorted(package_dir.rglob("*.py")):
        digest.update(source.relative_to(package_dir).as_posix().encode())
        digest.update(source.read_bytes())
    return {"robustdata": __version__, "data_code_sha256": digest.hexdigest()}


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError("file not found", path=path) from exc
    except OSError as exc:
        raise DataError(f"unreadable file ({exc.strerror or exc})", path=path) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"not valid UTF-8 JSON ({exc})", path=path) from exc
    except RecursionError as exc:  # json recurses once per nesting level
        raise DataError("JSON nested too deeply", path=path) from exc


def write_csv_atomic(path: str | Path, table: Any) -> None:
    """A pyarrow Table as a CSV file with a header row, written atomically."""
    import io

    import pyarrow.csv as pcsv

    buffer = io.BytesIO()
    pcsv.write_csv(table, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_parquet_atomic(path: str | Path, table: Any) -> None:
    """A pyarrow Table as a Parquet file (zstd), written atomically."""
    import io

    import pyarrow.parquet as pq  # here: most commands never write Parquet, and pyarrow is slow to import

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(path, buffer.getvalue())
