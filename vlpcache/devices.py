"""The `--device auto|cpu|cuda` rule every command shares (docs/design.md, conventions).

torch is imported only when a device is resolved, so the command line reads DEVICES without it.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vlpcache.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPU cores this process may use, at least 1: those it may run on (taskset, a SLURM job's cpuset: not the
    node's 128 that os.cpu_count() says), at most its cgroup's CPU quota rounded up (docker --cpus, a Kubernetes
    limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(cgroup: Path) -> int | None:
    """The CPU quota of the cgroup mounted at `cgroup` in whole cores, rounded up (cgroup v2's cpu.max, else v1's
    cpu.cfs_quota_us over cpu.cfs_period_us); None where there is none (or none readable)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota, period = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; cuda without a GPU is one clear error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    return torch.device(device)


def release_freed_memory() -> None:
    """Hand the memory freed on glibc's heap back to the system (malloc_trim); nothing elsewhere. Tensors
    of a few MB a batch, freed between ones still held, stay on the heap as holes that are not reused:
    `vlpcache index` grew by 150 MB every 1,024 videos it encoded, 18 GB over 100k, and stays flat with this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is its own business
        pass
