"""Progress bars that suit where they are written.

On a terminal, tqdm's bar, redrawn in place. In a DVC stage's output, a CI job's log or any file (stderr not
a TTY), redraws would fill the log with carriage returns and thousands of updates; there a bar is a plain
line now and then instead: at most one every LOG_INTERVAL_S seconds while it runs, and one when it ends.
Every progress bar in the library is made by `progress_bar`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # seconds between two lines of a bar in a log


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", disable: bool = False, leave: bool = False,
                 file: TextIO | None = None) -> tqdm | LogLines:
    """A bar over `iterable` (iterate over what this returns), or one that `update(n)` moves (use it as a
    context manager): tqdm on a terminal, LogLines elsewhere. Writes to `file`, default stderr."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=file)
    return LogLines(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogLines:
    """A progress bar for logs: tqdm's status text as whole lines, the first after `interval` seconds, then at
    most one per `interval`, and a last one when the bar ends (not when its loop fails: the error says why)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", disable: bool = False, file: TextIO | None = None,
                 interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # as tqdm does
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.file, self.interval, self.clock = disable, file, interval, clock
        self.n = 0
        self.start = self.last_line = clock()
        self.closed = disable

    def __iter__(self) -> Iterator:
        if self.disable:
            yield from self.iterable
            return
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.closed and self.clock() - self.last_line >= self.interval:
            self.write_line()

    def close(self) -> None:
        if not self.closed:
            self.write_line()
        self.closed = True

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        if kind is None:
            self.close()
        self.closed = True

    def write_line(self) -> None:
        now = self.clock()
        self.last_line = now
        file = sys.stderr if self.file is None else self.file
        file.write(tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc or "", unit=self.unit,
                                     ascii=True) + "\n")
        file.flush()
