"""Content-addressed files under data_dir: raw mail and attachments.

A blob is written to a temporary file, fsynced, renamed into place and its
folder fsynced, all before the transaction that refers to it commits. A crash
in between leaves at most an unreferenced file, never a row without its bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mailgate.store.durable import write_durably


class BlobStore:
    def __init__(self, root: Path, *, fsync: bool = True):
        self.root = root
        self.fsync = fsync

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per write: two threads storing the same mail at
        # once must not write into one temporary file.
        tmp = path.with_name(f".{digest}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        write_durably(tmp, path, data, fsync=self.fsync)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)
