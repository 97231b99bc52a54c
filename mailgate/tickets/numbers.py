"""Tracking numbers: sequential per year, unique across processes.

The counter row is incremented with UPDATE … RETURNING inside the message's
transaction, so the row lock (PostgreSQL) or the database write lock (SQLite,
BEGIN IMMEDIATE) serialises concurrent writers and a rolled-back unit of work
gives its number back.
"""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailgate.store.models import TicketSequence


def next_sequence(session: Session, year: int) -> int:
    for _ in range(3):
        seq = session.execute(
            update(TicketSequence)
            .where(TicketSequence.year == year)
            .values(last=TicketSequence.last + 1)
            .returning(TicketSequence.last)
        ).scalar_one_or_none()
        if seq is not None:
            return seq
        try:
            with session.begin_nested():  # another process may create the year's row first
                session.execute(insert(TicketSequence).values(year=year, last=1))
            return 1
        except IntegrityError:
            continue
    raise RuntimeError(f"could not allocate a tracking number for {year}")


def format_number(number_format: str, year: int, seq: int) -> str:
    return number_format.format(year=year, seq=seq)


def last_sequence(session: Session, year: int) -> int:
    return session.scalar(select(TicketSequence.last).where(TicketSequence.year == year)) or 0
