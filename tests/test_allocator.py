"""The malloc thresholds the entry points set (robustdata/allocator.py): in a `robustdata` command and in a
program that imports the Python API, a 16 MiB block comes from the reusable heap, not from a fresh mmap,
unless the user opts out. Importing the library alone leaves the allocator as it was."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

# mallinfo2().hblkhd: bytes currently held in mmap'd blocks
MEASURE = """
import ctypes
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(ctypes.c_void_p(block))
"""
ENTRY = {
    "library": "import robustdata, robustdata.config, robustdata.io\n",
    "api": "import robustdata.api\n",
    # the console script's function, as `robustdata --version` runs it; it ends with SystemExit
    "cli": "import sys\nfrom robustdata.cli import run\nsys.argv = ['robustdata', '--version']\ntry:\n    run()\n"
           "except SystemExit:\n    pass\n",
}


def mmapped_bytes_for_a_16mib_block(entry: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", ENTRY[entry] + MEASURE], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_an_entry_point_keeps_large_blocks_on_the_heap_and_the_opt_out_restores_glibcs_default(entry):
    assert mmapped_bytes_for_a_16mib_block(entry) == 0
    assert mmapped_bytes_for_a_16mib_block(entry, ROBUSTDATA_MALLOC="system") >= 16 << 20


def test_importing_the_library_leaves_the_allocator_alone():
    assert mmapped_bytes_for_a_16mib_block("library") >= 16 << 20


def test_a_users_own_malloc_tuning_wins():
    # the user asks for mmap above 1 MiB: robustdata must not raise it back to 64 MiB
    assert mmapped_bytes_for_a_16mib_block("api", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576") >= 16 << 20
