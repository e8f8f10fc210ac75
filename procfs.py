"""What Linux reports about this process in /proc/self/status (memory sizes, the umask).

Read without side effects (the umask, for one, can otherwise only be read by setting it); every reader gets
None where /proc is missing (other systems) and decides its own fallback.
"""

from __future__ import annotations

from pathlib import Path


def status_value(field: str) -> str | None:
    """The first word of `field`'s line (e.g. "0022" for "Umask", "1234" for "VmRSS"), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                words = line.split()
                return words[1] if len(words) > 1 else None
    except OSError:
        return None
    return None


def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, VmSize …) in KiB, or None."""
    value = status_value(field)
    return int(value) if value is not None and value.isdigit() else None
