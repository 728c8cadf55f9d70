"""The `--device auto|cpu|cuda` rule every command shares (docs/design.md, conventions).

torch is imported only when a device is resolved, so the command line reads DEVICES without it.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vlpcache.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int:
    """The CPU cores this process may use, at least 1: those it may run on (taskset, a SLURM job's cpuset: not the
    node's 128 that os.cpu_count() says), at most its cgroups' CPU quota rounded up (docker --cpus, a Kubernetes
    limit); `cgroup`: where the cgroup filesystems are mounted, `proc`: the process's cgroups (/proc/self/cgroup)."""
    cores = runnable_cores()
    quota = cgroup_quota(cgroup, proc)
    return max(1, min(cores, quota) if quota else cores)


def runnable_cores() -> int:
    """The cores this process may run on: its affinity (taskset, a cpuset), where the system says it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def quota_threads() -> int:
    """The threads a thread pool should use where the cgroup's CPU quota is below the cores this process may run
    on (torch's and onnxruntime's own defaults follow the latter: `docker --cpus 2` on a 64-core machine would run
    64 threads on 2 cores' time); 0 where their defaults fit."""
    usable = usable_cores()
    return usable if usable < runnable_cores() else 0


def fit_torch_threads() -> None:
    """torch's CPU threads bounded by the cgroup's CPU quota (quota_threads), unless the user set OMP_NUM_THREADS."""
    if (threads := quota_threads()) and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)


_torch_threads_spin = False  # torch was loaded, reading the wait policy, before ask_openmp_threads_to_sleep


def ask_openmp_threads_to_sleep() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy: OpenMP threads that spin while waiting made FAISS 3-4x
    slower on a busy machine (PQ training 33 s vs 9 s on 2 shared cores), and torch's text encoding 5x. Each OpenMP
    runtime reads it once, as it loads: torch loaded before (a notebook's `import torch` first) keeps spinning threads,
    which encoding_threads narrows."""
    global _torch_threads_spin
    if "OMP_WAIT_POLICY" not in os.environ:
        _torch_threads_spin = "torch" in sys.modules
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def encoding_threads_where_spinning() -> int | None:
    """torch's CPU threads for an encoding phase where its threads spin (None elsewhere: torch's own count): one core
    left to the rest of the process and machine, which a spinning pool as wide as the cores starved (1,000 captions:
    70 s with 2 threads against 13 s with 1 on 2 busy cores; torch loaded after vlpcache, 2 sleeping threads: 15 s)."""
    return max(1, usable_cores() - 1) if _torch_threads_spin else None


@contextmanager
def encoding_threads():
    """Within: torch encodes with encoding_threads_where_spinning() threads where its OpenMP threads spin (at most as
    many as it had; OpenMP's count is the calling thread's own, so each thread narrows and restores its own)."""
    wanted = encoding_threads_where_spinning()
    if wanted is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(wanted, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cgroup_quota(cgroup: Path, proc: Path) -> int | None:
    """The smallest CPU quota of the process's cgroup and those above it, in whole cores rounded up (cgroup v2's
    cpu.max, v1's cpu.cfs_quota_us over cpu.cfs_period_us); None where there is none, or none can be read. A
    path the mount does not show (a container's own cgroup mounted as its root) is looked for higher up."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2: the unified tree (beside v1's in a hybrid layout)
            bases = [cgroup, cgroup / "unified"]
        elif "cpu" in controllers.split(","):
            bases = [cgroup / controllers, cgroup / "cpu"]
        else:
            continue
        for base in bases:
            for folder in _up_from(base, path):
                if (quota := _quota_in(folder)) is not None:
                    quotas.append(quota)
    return min(quotas) if quotas else None


def _up_from(base: Path, path: str) -> list[Path]:
    """`base`/`path` and each folder above it up to `base`."""
    parts = [part for part in path.split("/") if part and part != ".."]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_in(folder: Path) -> int | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota, period = int(quota), int(period)
    except ValueError:  # "max": no quota here
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags as Linux lists them in `cpuinfo` (x86's `flags` line: avx512_bf16, amx_bf16, ...),
    or None where it cannot tell (no such file: not Linux; no `flags` line: not x86)."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        name, colon, value = line.partition(":")
        if colon and name.strip() == "flags":
            return set(value.split())
    return None


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; cuda without a GPU is one clear error. Every command that
    computes with torch comes here first, so its CPU threads are kept within a cgroup's quota here too."""
    import torch

    fit_torch_threads()

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
