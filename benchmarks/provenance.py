"""What every benchmark JSON records about how it was made: the commit, the command and the machine."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from robustdata.io import code_version

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "note": None if commit else "no git checkout here (a copied tree): see code_version"}


def cpu_model() -> dict[str, Any]:
    """The CPU's name and whether it has bf16 instructions (CPU bf16 autocast is slow without them)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"name": platform.processor() or None, "bf16": None}
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"name": name, "bf16": sorted(flags & {"amx_bf16", "avx512_bf16"})}


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1) if cuda else None,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def provenance(benchmark: str) -> dict[str, Any]:
    """The fields that say how a benchmark JSON was made."""
    return {"benchmark": benchmark, "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "git": git_commit(), "code_version": code_version(), "machine": machine()}
