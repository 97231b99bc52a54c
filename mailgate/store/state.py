"""A few remembered facts (directory checksum, IMAP positions) in the `state` table."""

from __future__ import annotations

from sqlalchemy.orm import Session

from mailgate.store.models import State


def get_state(session: Session, key: str) -> str | None:
    row = session.get(State, key)
    return row.value if row else None


def set_state(session: Session, key: str, value: str) -> None:
    row = session.get(State, key)
    if row is None:
        session.add(State(key=key, value=value))
    else:
        row.value = value
