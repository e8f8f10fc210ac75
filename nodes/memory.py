"""How much memory a node may still allocate, so work that cannot fit is refused before it starts.

A node whose output grows with its inputs (frames × size² for a video IMAGE) would otherwise run for
minutes and then die mid-allocation — with SIGABRT under an address-space limit, the OOM killer under a
cgroup limit — taking the whole ComfyUI process with it. The bound is the tightest of: the address-space
limit (`ulimit -v`) less what the process has mapped, the cgroup's memory limit less its usage, and the
memory the kernel reports available.
"""

from __future__ import annotations

import resource
from pathlib import Path

from ..procfs import status_kib

GB = 1e9


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's cgroup (v2, then v1); None without a limit."""
    folders = [Path("/sys/fs/cgroup")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                folders.insert(0, Path("/sys/fs/cgroup") / line[3:].lstrip("/"))
    except OSError:
        pass
    for folder in folders:
        limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        if limit is not None and used is not None:
            return limit - used
    v1 = Path("/sys/fs/cgroup/memory")
    limit, used = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
    if limit is not None and used is not None and limit < 1 << 60:  # v1 writes a huge number for no limit
        return limit - used
    return None


def _system_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # other systems: ComfyUI installs it
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def available_memory() -> tuple[int, str] | None:
    """(bytes this process can still allocate, which limit that is), or None when nothing is known."""
    bounds = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    mapped = status_kib("VmSize")
    if soft != resource.RLIM_INFINITY and mapped is not None:
        bounds.append((soft - mapped * 1024, f"the address-space limit (ulimit -v {soft // 1024})"))
    room = _cgroup_room()
    if room is not None:
        bounds.append((room, "the cgroup memory limit"))
    free = _system_available()
    if free is not None:
        bounds.append((free, "the memory available on this machine"))
    return min(bounds) if bounds else None


def check_fits(need: int, what: str, lower: str) -> None:
    """Raise MemoryError before starting when `need` bytes (for `what`) exceed what can be allocated;
    `lower` tells the user which inputs to change."""
    room = available_memory()
    if room is not None and need > room[0]:
        raise MemoryError(f"{what} needs about {need / GB:.1f} GB, but {room[1]} leaves {max(0, room[0]) / GB:.1f} GB; "
                          f"{lower}")
