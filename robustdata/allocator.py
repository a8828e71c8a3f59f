"""Keep freed memory in the process instead of handing it back to the OS after every training step.

PyTorch on CPU frees and re-allocates the same multi-megabyte activation and gradient buffers at every
step. glibc's malloc starts by serving such blocks with mmap and unmaps them on free; it raises that
threshold only as it sees frees, and trims the heap top whenever more than twice the threshold is
free. Until it has adapted, every step pays fresh page faults and munmap calls: a 30 s training run in
a fresh process took 36-41 s, against 29-30 s for the same run later in the same process (measured
with the quick profile's train_standard). Since each DVC stage is a fresh process, the whole pipeline
paid that warm-up once per stage. Fixed thresholds remove it from the first step on.

The entry points set them, once per process: the `robustdata` command (robustdata.cli.run) before it
parses its arguments, and the Python API (robustdata.api) when it is imported. Importing the library
alone leaves the process's allocator as it found it: a program that embeds it decides for itself.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD = 64 << 20  # blocks below 64 MiB come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # up to 512 MiB of free heap top stays with the process
OPT_OUT = "ROBUSTDATA_MALLOC"  # set to "system" to keep the C library's own behaviour


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for this process (and the processes it forks); True if set.

    Does nothing outside glibc, when ROBUSTDATA_MALLOC=system, or when the user tunes malloc themselves
    (MALLOC_*_ variables or glibc.malloc tunables), so their settings win.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "system":
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
