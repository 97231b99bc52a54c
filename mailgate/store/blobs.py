"""Content-addressed raw mail and attachments, in files or in the database.

Either store writes a blob durably before the transaction that refers to it
commits. A crash in between leaves at most an unreferenced blob, never a row
without its bytes. A missing blob is `FileNotFoundError` from both.

- `BlobStore` (files under data_dir): a temporary file, fsynced, renamed into
  place and its folder fsynced. The default on SQLite, where the database is a
  file on the same machine anyway.
- `DatabaseBlobStore` (the `blobs` table): the default on PostgreSQL. Several
  instances then need no shared filesystem, one backup (or replica) holds the
  rows and their bytes consistently, and durability is PostgreSQL's commit
  rather than a network filesystem's idea of fsync and rename.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from mailgate.store.db import BLOB_LOCK_SPACE, transaction_lock
from mailgate.store.durable import make_dirs_durably, write_durably
from mailgate.store.models import Article, AttachmentRow, Blob, IngestRecord


class Blobs(Protocol):
    def put(self, data: bytes) -> str: ...
    def get(self, sha256: str) -> bytes: ...
    def size(self, sha256: str) -> int | None: ...
    def delete(self, sha256: str) -> None: ...


def referenced(session: Session, sha: str) -> bool:
    """Does any row still point at these bytes (the same file may serve several)?"""
    for column in (IngestRecord.raw_sha256, Article.raw_sha256, AttachmentRow.sha256):
        if session.scalar(select(func.count()).where(column == sha)):
            return True
    return False


def _lock(session: Session, sha: str, *, shared: bool) -> None:
    """Serialise deleting a blob with storing a new reference to it, until the
    session's transaction ends. Keyed by the digest's first 28 bits: a collision
    only makes two unrelated blobs wait for each other."""
    transaction_lock(session, BLOB_LOCK_SPACE, int(_checked(sha)[:7], 16), shared=shared)


def drop_unreferenced(
    session: Session, blobs: Blobs, shas: Iterable[str], *, dry_run: bool = False
) -> int:
    """Delete the bytes no row refers to any more, after flushing the session's
    changes; before its commit, so a crash leaves rows to redo, not orphan bytes.
    `dry_run`: count them only (the caller rolls back).

    Each blob is locked before its references are counted, and stays locked
    until the commit: a unit of work storing the same bytes on another instance
    (`keep_stored`) either committed its rows before the count sees them, or
    finds the bytes gone after our commit and writes them again."""
    session.flush()
    dropped = 0
    for sha in sorted(set(shas)):
        _lock(session, sha, shared=False)
        if not referenced(session, sha):
            if not dry_run:
                blobs.delete(sha)
            dropped += 1
    return dropped


def keep_stored(session: Session, blobs: Blobs, payloads: Mapping[str, bytes]) -> None:
    """Called by a unit of work that refers to these blobs, just before its commit:
    they must still exist when it commits. Each was written before the unit of
    work began (`put`, already there when the content was known), so retention
    or an erasure may have deleted it since, having seen no row refer to it yet:
    a mail answered 250 lost its attachment (the logo in every signature is one
    blob). Under the blob's lock (see drop_unreferenced), what is missing now is
    written again."""
    for sha in sorted(payloads):
        _lock(session, sha, shared=True)
        if blobs.size(sha) is None:
            blobs.put(payloads[sha])


def _checked(sha256: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return sha256


class BlobStore:
    def __init__(self, root: Path, *, fsync: bool = True):
        self.root = root
        self.fsync = fsync

    def path_for(self, sha256: str) -> Path:
        _checked(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest)
        if path.exists():
            return digest
        make_dirs_durably(path.parent, fsync=self.fsync)
        # A name of its own per write: two threads storing the same mail at
        # once must not write into one temporary file.
        tmp = path.with_name(f".{digest}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        write_durably(tmp, path, data, fsync=self.fsync)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()

    def size(self, sha256: str) -> int | None:
        path = self.path_for(sha256)
        return path.stat().st_size if path.exists() else None

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)


class DatabaseBlobStore:
    """Each put commits in a short transaction of its own, like the file store's
    fsync: the bytes are durable before the unit of work that refers to them."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with self.sessions.begin() as session:
            dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            session.execute(
                dialect.insert(Blob)
                .values(sha256=digest, data=data, size=len(data))
                .on_conflict_do_nothing(index_elements=["sha256"])
            )
        return digest

    def get(self, sha256: str) -> bytes:
        with self.sessions() as session:
            data = session.scalar(select(Blob.data).where(Blob.sha256 == _checked(sha256)))
        if data is None:
            raise FileNotFoundError(f"no blob {sha256}")
        return bytes(data)

    def size(self, sha256: str) -> int | None:
        with self.sessions() as session:
            return session.scalar(select(Blob.size).where(Blob.sha256 == _checked(sha256)))

    def delete(self, sha256: str) -> None:
        with self.sessions.begin() as session:
            session.execute(delete(Blob).where(Blob.sha256 == _checked(sha256)))
