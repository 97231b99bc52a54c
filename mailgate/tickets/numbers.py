"""Tracking numbers: sequential per year, unique across processes and instances.

- SQLite: a counter row per year, incremented with UPDATE … RETURNING inside
  the message's transaction. The database write lock (BEGIN IMMEDIATE)
  serialises writers anyway, and a rolled-back unit of work gives its number
  back: no gaps.
- PostgreSQL: a sequence per year (`ticket_number_2026`). A counter row would
  be locked from the increment to the commit, so every instance creating a
  ticket would queue behind the slowest transaction; `nextval` never waits.
  The price is a gap when a unit of work rolls back after taking a number
  (a crash, or a concurrent duplicate delivery): numbers identify tickets,
  they do not count them. A year's sequence starts after that year's counter
  row, so a database that ran on counter rows carries on where it was.
"""

from __future__ import annotations

from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.orm import Session

from mailgate.store.models import TicketSequence

# (database URL, year) whose sequence is known to exist: sequences are never dropped.
_sequences: set[tuple[str, int]] = set()


def next_sequence(session: Session, year: int, *, peek: bool = False) -> int:
    """The year's next number. `peek` (a dry run): the number the next ticket
    would get, taken from nothing; a rolled-back counter row gives its number
    back, but `nextval` never does."""
    if session.get_bind().dialect.name == "postgresql":
        return _peek_sequence(session, year) if peek else _from_sequence(session, year)
    return _from_counter_row(session, year)


def _from_counter_row(session: Session, year: int) -> int:
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


def _from_sequence(session: Session, year: int) -> int:
    name = f"ticket_number_{int(year)}"
    bind = session.get_bind()
    key = (str(bind.url), year)
    if key not in _sequences:
        _create_sequence(bind.engine, name, year)  # type: ignore[union-attr]
        _sequences.add(key)
    return int(session.scalar(text(f"SELECT nextval('{name}')")))


def _peek_sequence(session: Session, year: int) -> int:
    name = f"ticket_number_{int(year)}"
    exists = session.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": name})
    if not exists:
        last = session.scalar(select(TicketSequence.last).where(TicketSequence.year == year))
        return (last or 0) + 1
    last, called = session.execute(text(f"SELECT last_value, is_called FROM {name}")).one()
    return int(last) + 1 if called else int(last)


def _create_sequence(engine: Engine, name: str, year: int) -> None:
    """Created and committed on a connection of its own: inside the message's
    transaction it would be invisible to other transactions until that commits,
    and gone if it rolls back, while this process already believed in it."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        start = (
            conn.scalar(select(TicketSequence.last).where(TicketSequence.year == year)) or 0
        ) + 1
        for _ in range(3):
            try:
                conn.execute(text(f"CREATE SEQUENCE IF NOT EXISTS {name} START {start}"))
                return
            except (IntegrityError, ProgrammingError):
                # Another instance created it at the same moment (a unique
                # violation on the catalogue): IF NOT EXISTS sees it now.
                continue
    raise RuntimeError(f"could not create the sequence {name}")


def format_number(number_format: str, year: int, seq: int) -> str:
    return number_format.format(year=year, seq=seq)
