"""Writing a file so that a crash leaves either nothing or the whole file.

Write under a temporary name (created exclusively, so two writers never share
it), fsync, rename into place, fsync the folder. Used by the blob store and
the Maildir transport, which both promise "stored" only once this returns.
A folder made for the file is itself an entry of its parent: that parent is
fsynced too, or a crash could lose the folder and the file with it.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(tmp: Path, final: Path, data: bytes, *, fsync: bool = True) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: Path, *, mode: int = 0o777, fsync: bool = True) -> None:
    """`mkdir -p`, fsyncing the parent of each folder it creates."""
    if path.is_dir():
        return
    make_dirs_durably(path.parent, mode=mode, fsync=fsync)
    path.mkdir(mode=mode, exist_ok=True)  # another writer may have made it meanwhile
    if fsync:
        fsync_dir(path.parent)
