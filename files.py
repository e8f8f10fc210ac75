"""How the pack writes files: whole or not at all, and never over a file that is already there.

Every file the pack writes goes through here. The bytes go to a hidden temporary file in the
target's own folder (same file system, so claiming the name is one atomic step), are flushed to
disk, and only then get their real name: `os.link` for a new file — which fails instead of
replacing anything, so two writers (two ComfyUI queues, two headless runs) can never take the
same name — or `os.replace` for a file the pack owns and rewrites (`write_replacing`). If the
write fails or is interrupted (Ctrl-C; SIGTERM once `raise_on_sigterm` is installed, as the CLI
does), the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .procfs import status_value

Writer = Callable[[BinaryIO], None]
TEMP_SUFFIX = ".tmp"
# file systems without hard links (FAT, some network shares) answer link() with one of these
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _new_file_mode() -> int:
    """The mode `open()` would give a new file (0o666 less the umask): mkstemp's private 0o600 must not
    outlive the temporary name, or saved images end up unreadable to the user's other programs.

    Linux reports the umask in /proc without changing it; elsewhere it can only be read by setting it,
    which is briefly process-wide, so that is the fallback."""
    reported = status_value("Umask")
    if reported is not None:
        return 0o666 & ~int(reported, 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temp(folder: Path, name: str, write: Writer) -> Path:
    """`write` into a fresh hidden file of `folder`, flushed and synced; removed again if anything fails."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
    temp = Path(temp_name)
    try:
        os.fchmod(handle, _new_file_mode())
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _claim(temp: Path, target: Path) -> None:
    """Give `temp`'s content the name `target` atomically, failing with FileExistsError if it is taken."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        # no hard links here: claim the name exclusively, then move the finished bytes onto the claim
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        try:
            os.replace(temp, target)
        except BaseException:
            target.unlink(missing_ok=True)
            raise


def write_new(path: str | Path, write: Writer) -> Path:
    """Write a new file whole or not at all; FileExistsError (nothing written) if `path` exists."""
    path = Path(path)
    temp = _write_temp(path.parent, path.name, write)
    try:
        _claim(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_numbered(folder: str | Path, stem: str, suffix: str, write: Writer) -> Path:
    """Write `<stem>_<NNNNN><suffix>` in `folder` at the next free counter, whole or not at all.

    The counter starts after the highest one present (not at the number of files: a gap or a kept
    file must not be written over), and a name another writer claims first is skipped.
    """
    folder = Path(folder)
    temp = _write_temp(folder, f"{stem}{suffix}", write)
    try:
        index = next_index(folder, stem, suffix)
        while True:
            target = folder / f"{stem}_{index:05d}{suffix}"
            try:
                _claim(temp, target)
                return target
            except FileExistsError:
                index += 1
    finally:
        temp.unlink(missing_ok=True)


def next_index(folder: Path, stem: str, suffix: str) -> int:
    """One past the highest counter of `<stem>_<digits><suffix>` files in `folder` (0 when none)."""
    pattern = re.compile(rf"{re.escape(stem)}_(\d+){re.escape(suffix)}")
    found = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(found, default=-1) + 1


def write_replacing(path: str | Path, write: Writer) -> Path:
    """Write a file the pack owns and rewrites (trained weights, benchmark results): readers see the
    old content or the new, never a mix, and an interrupted write leaves the old file in place."""
    path = Path(path)
    temp = _write_temp(path.parent, path.name, write)
    try:
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def text_writer(text: str) -> Writer:
    """A `Writer` for UTF-8 text."""
    data = text.encode("utf-8")

    def write(stream: BinaryIO) -> None:
        stream.write(data)

    return write


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) so `finally` blocks run (temporary files are removed).

    Python's default SIGTERM action ends the process without unwinding; the CLI installs this once
    at start. Library code never touches signal handlers (inside ComfyUI the host owns them).
    """
    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
