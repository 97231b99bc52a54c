"""An organisation's prepaid credit: packs bought, and the append-only ledger.

Every change is a new `CreditEntry`: a purchase, a spend, an expiry, a
rollover (out of one pack, into another, at the same moment), a reversal (a
correction names the entry it reverses), an overdraft and its repayment.
A pack's remaining credit and an organisation's balance are sums, so the
statement always reconciles with the balance.

Writers lock the organisation's row first (a no-op under SQLite, where
BEGIN IMMEDIATE already serialises writers; `FOR UPDATE` on PostgreSQL), so
two spends on the last credit cannot both take it.

Organisations that never bought a pack are not on prepaid credit: their time
is recorded, nothing is charged.

`now` is always the real clock (the app's, which tests control): expiries are
booked only once they are due, and a pack activated later is bought but not
spendable, nor counted in the balance, before its day. Anything dated after
`now` (a later pack's purchase) is left out of balances and statements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgate.config import Credits
from mailgate.credits.rules import allocate, cost, pack_end
from mailgate.store.models import CreditEntry, CreditPackRow, Organisation, Ticket, TimeEntry


class CreditError(Exception):
    """A request the ledger refuses; the message says why, for the operator or staff."""


class NotEnoughCredit(CreditError):
    pass


@dataclass(frozen=True)
class PackBalance:
    id: int
    pack: str
    remaining: int
    activated_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Balance:
    organisation_id: str
    total: int  # entries dated up to now; may be negative: an overdraft
    packs: tuple[PackBalance, ...]  # valid now, with credit left, oldest expiry first
    on_credit: bool  # has the organisation ever bought a pack?
    later: tuple[PackBalance, ...] = ()  # bought, activated after now: not in `total` yet

    @property
    def spendable(self) -> int:
        """What valid packs still hold; an overdraft does not lower it."""
        return sum(p.remaining for p in self.packs)

    @property
    def next_expiry(self) -> datetime | None:
        return self.packs[0].expires_at if self.packs else None


@dataclass(frozen=True)
class Charge:
    credits: int  # what the time entry cost (0: free, or not on credit)
    entries: tuple[CreditEntry, ...]
    balance_before: int
    balance_after: int


@dataclass(frozen=True)
class Statement:
    organisation_id: str
    start: datetime | None
    end: datetime | None
    opening: int
    entries: list[dict[str, Any]] = field(default_factory=list)
    closing: int = 0
    totals: dict[str, int] = field(default_factory=dict)


# -- reading ---------------------------------------------------------------------


def _lock(session: Session, org_id: str) -> Organisation:
    org = session.scalar(select(Organisation).where(Organisation.id == org_id).with_for_update())
    if org is None:
        raise CreditError(f"no organisation {org_id!r} in the directory")
    return org


def _remaining(session: Session, pack_ids: Sequence[int]) -> dict[int, int]:
    rows = session.execute(
        select(CreditEntry.pack_id, func.sum(CreditEntry.credits))
        .where(CreditEntry.pack_id.in_(pack_ids))
        .group_by(CreditEntry.pack_id)
    )
    return {pack_id: total or 0 for pack_id, total in rows}


def _packs(session: Session, org_id: str) -> list[CreditPackRow]:
    query = (
        select(CreditPackRow)
        .where(CreditPackRow.organisation_id == org_id)
        .order_by(CreditPackRow.expires_at, CreditPackRow.id)
    )
    return list(session.scalars(query))


def balance(session: Session, org_id: str, now: datetime) -> Balance:
    """The balance as the ledger stands (call `settle` first to book due expiries)."""
    return _balance(session, org_id, now, _packs(session, org_id))


def _balance(session: Session, org_id: str, now: datetime, packs: list[CreditPackRow]) -> Balance:
    remaining = _remaining(session, [p.id for p in packs]) if packs else {}
    # A later pack's purchase (and an overdraft it repays) is dated at its
    # activation: the balance is what can be spent now, not what will be.
    total = session.scalar(
        select(func.coalesce(func.sum(CreditEntry.credits), 0)).where(
            CreditEntry.organisation_id == org_id, CreditEntry.at <= now
        )
    )

    def listed(p: CreditPackRow) -> PackBalance:
        return PackBalance(p.id, p.pack, remaining.get(p.id, 0), p.activated_at, p.expires_at)

    valid = tuple(
        listed(p)
        for p in packs
        if p.activated_at <= now < p.expires_at and remaining.get(p.id, 0) > 0
    )
    starting = sorted(packs, key=lambda p: (p.activated_at, p.id))
    later = tuple(listed(p) for p in starting if p.activated_at > now)
    return Balance(org_id, int(total or 0), valid, bool(packs), later)


# -- writing ---------------------------------------------------------------------


def _entry(session: Session, org_id: str, kind: str, credits: int, at: datetime,
           now: datetime, **fields: Any) -> CreditEntry:  # fmt: skip
    entry = CreditEntry(organisation_id=org_id, kind=kind, credits=credits, at=at,
                        created_at=now, **{"note": "", **fields})  # fmt: skip
    session.add(entry)
    return entry


def add_pack(
    session: Session,
    settings: Credits,
    org_id: str,
    pack_name: str,
    *,
    activated: datetime,
    reference: str,
    now: datetime,
) -> CreditPackRow:
    """Record a bought pack: a purchase entry; an overdraft is repaid from it first."""
    pack = settings.packs.get(pack_name)
    if pack is None:
        known = ", ".join(sorted(settings.packs)) or "none"
        raise CreditError(f"no pack {pack_name!r} in settings credits.packs (known: {known})")
    org = _lock(session, org_id)
    # What ended before a backdated activation is settled first; what ends after
    # it stays for the sweep, so it can roll over into this pack. Never beyond
    # now: a pack starting next year ends nothing today.
    settle(session, settings, org_id, min(activated, now))
    row = CreditPackRow(
        organisation_id=org_id,
        pack=pack_name,
        credits=pack.size,
        activated_at=activated,
        expires_at=pack_end(activated, pack.validity_months, ZoneInfo(org.timezone or "UTC")),
        reference=reference[:200],
        created_at=now,
    )
    session.add(row)
    session.flush()
    note = f"pack {pack_name}" + (f", {reference}" if reference else "")
    _entry(session, org_id, "purchase", pack.size, activated, now, pack_id=row.id,
           note=note[:300])  # fmt: skip
    session.flush()
    _repay_overdraft(session, org_id, now, [row])  # a pack valid now repays at once
    return row


def settled_balance(session: Session, settings: Credits, org_id: str, now: datetime) -> Balance:
    """The balance at `now`, after booking the expiries and rollovers due by then."""
    packs = _locked_packs(session, org_id)  # settling books entries; the packs stay the same
    _settle(session, settings, org_id, now, packs)
    return _balance(session, org_id, now, packs)


def settle(session: Session, settings: Credits, org_id: str, now: datetime) -> list[CreditEntry]:
    """Book what ended by `now`: each pack past its end with credit left either rolls
    it into a pack activated before that end (when `rollover`), or expires it. Dated
    at the pack's end, whenever this runs; running it twice books nothing twice.

    `now` is the real clock: what this books stays (the ledger is append-only), so
    a later time would end packs that are still valid."""
    return _settle(session, settings, org_id, now, _locked_packs(session, org_id))


def _locked_packs(session: Session, org_id: str) -> list[CreditPackRow]:
    """The organisation's packs, read under its lock when it has any, for settling.

    Two settlements at once (the first mails after a pack's end arriving on two
    instances, the hourly sweep and a `credits balance`) would each book the same
    expiry on PostgreSQL; locked, the second waits and finds it booked. Without
    packs there is nothing to book, so most organisations' mail takes no lock."""
    packs = _packs(session, org_id)
    if packs:
        _lock(session, org_id)
        packs = _packs(session, org_id)  # one added meanwhile can take a rollover
    return packs


def _settle(
    session: Session, settings: Credits, org_id: str, now: datetime, packs: list[CreditPackRow]
) -> list[CreditEntry]:
    # Before anything ends: a pack that became valid while the organisation was
    # overdrawn repays it first, whether it was bought then or recorded earlier
    # with a later activation date.
    booked = _repay_overdraft(session, org_id, now, packs)
    for pack in packs:  # oldest end first, so a chain of rollovers settles in order
        if pack.expires_at > now:
            break
        left = _remaining(session, [pack.id]).get(pack.id, 0)
        if left <= 0:
            continue
        into = _rollover_target(packs, pack) if settings.rollover else None
        # At its end; or, for credits given back after it (a spend reversed
        # later), when they came back: dated at the end, they changed a
        # statement already sent.
        ended = max(pack.expires_at, _last_entry_at(session, pack.id))
        if into is None:
            booked.append(_entry(session, org_id, "expiry", -left, ended, now,
                                 pack_id=pack.id, note=f"pack #{pack.id} ended"))  # fmt: skip
        else:
            booked += [
                _entry(session, org_id, "rollover_out", -left, ended, now,
                       pack_id=pack.id, note=f"carried over into pack #{into.id}"),
                _entry(session, org_id, "rollover_in", left, ended, now,
                       pack_id=into.id, note=f"carried over from pack #{pack.id}"),
            ]  # fmt: skip
        session.flush()
    return booked


def _last_entry_at(session: Session, pack_id: int) -> datetime:
    return session.scalar(select(func.max(CreditEntry.at)).where(CreditEntry.pack_id == pack_id))


def _overdraft(session: Session, org_id: str, now: datetime) -> tuple[int, datetime | None]:
    """The overdraft's side of the ledger at `now` (entries on no pack): its balance,
    negative while owed, and when its last entry was booked."""
    balance, last = session.execute(
        select(func.coalesce(func.sum(CreditEntry.credits), 0), func.max(CreditEntry.at)).where(
            CreditEntry.organisation_id == org_id,
            CreditEntry.pack_id.is_(None),
            CreditEntry.at <= now,
        )
    ).one()
    return int(balance or 0), last


def _repay_overdraft(
    session: Session, org_id: str, now: datetime, packs: Sequence[CreditPackRow]
) -> list[CreditEntry]:
    """Pay an overdraft back out of packs, oldest end first: each repayment is a pair
    of entries (out of the pack, into the overdraft), dated when it became possible,
    the later of the pack's activation and the last overdraft, while the pack was
    valid. Booked once: an overdraft paid back is no longer owed."""
    if not packs:  # never on credit (most organisations): nothing to ask the database
        return []
    balance, last_owed = _overdraft(session, org_id, now)
    if balance >= 0:
        return []
    remaining = _remaining(session, [p.id for p in packs])
    when = {p.id: max(p.activated_at, last_owed) for p in packs}
    usable = [(p.id, remaining.get(p.id, 0)) for p in packs
              if when[p.id] <= now and when[p.id] < p.expires_at]  # fmt: skip
    taken, _ = allocate(-balance, usable)
    booked = [entry for pack_id, amount in taken
              for entry in _repayment(session, org_id, pack_id, -amount, when[pack_id], now,
                                      "overdraft paid back from")]  # fmt: skip
    session.flush()
    return booked


def _repayment(session: Session, org_id: str, pack_id: int, into_pack: int, at: datetime,
               now: datetime, what: str) -> list[CreditEntry]:  # fmt: skip
    """A repayment is a pair of entries: `into_pack` credits into the pack (negative:
    out of it, paying the overdraft) and the opposite on the overdraft's side."""
    return [
        _entry(session, org_id, "repayment", into_pack, at, now, pack_id=pack_id,
               note=f"{what} this pack"),
        _entry(session, org_id, "repayment", -into_pack, at, now, note=f"{what} pack #{pack_id}"),
    ]  # fmt: skip


def _give_back_repayments(session: Session, org_id: str, now: datetime) -> list[CreditEntry]:
    """After an overdraft is reversed: what packs already paid back for it goes back
    into them, newest repayment first, as a pair of entries like the repayment.

    Without this, the reversal's credits sat outside every pack: counted in the
    balance the customer is told, yet never spendable, and never expiring."""
    surplus, _ = _overdraft(session, org_id, now)
    if surplus <= 0:  # still owed, or even: every pack keeps what it paid
        return []
    paid = session.execute(
        select(CreditEntry.pack_id, func.sum(CreditEntry.credits))
        .where(
            CreditEntry.organisation_id == org_id,
            CreditEntry.kind == "repayment",
            CreditEntry.pack_id.is_not(None),
        )
        .group_by(CreditEntry.pack_id)
        .order_by(func.max(CreditEntry.id).desc())
    )
    # What each pack paid, less what it got back.
    taken, _ = allocate(surplus, [(pack_id, -int(net or 0)) for pack_id, net in paid])
    booked = [entry for pack_id, amount in taken
              for entry in _repayment(session, org_id, pack_id, amount, now, now,
                                      "overdraft reversed: given back to")]  # fmt: skip
    session.flush()
    return booked


def _rollover_target(packs: Sequence[CreditPackRow], ending: CreditPackRow) -> CreditPackRow | None:
    """The newest pack activated before `ending` ends and still valid after it."""
    candidates = [
        p for p in packs if p.id != ending.id and p.activated_at < ending.expires_at < p.expires_at
    ]
    return max(candidates, key=lambda p: (p.activated_at, p.id), default=None)


def charge(
    session: Session,
    settings: Credits,
    ticket: Ticket,
    entry: TimeEntry,
    now: datetime,
) -> Charge:
    """Deduct a time entry from the oldest valid packs first. NotEnoughCredit when
    the organisation may not overdraw and has too little."""
    org_id = ticket.organisation_id
    _lock(session, org_id)
    before = settled_balance(session, settings, org_id, now)
    credits = cost(entry.minutes, urgent=entry.urgent, bug=ticket.bug,
                   urgent_multiplier=settings.urgent_multiplier)  # fmt: skip
    if not before.on_credit or credits == 0:
        return Charge(0, (), before.total, before.total)
    taken, missing = allocate(credits, [(p.id, p.remaining) for p in before.packs])
    if missing and not settings.overdraft_for(org_id):
        raise NotEnoughCredit(
            f"{ticket.number}: {credits} credit(s) needed, {max(before.total, 0)} left "
            f"for {org_id} (buy a pack: mailgate credits add {org_id} PACK)"
        )
    note = f"{entry.minutes} min" + (" urgent" if entry.urgent else "") + f" by {entry.staff_email}"
    booked = [
        _entry(session, org_id, "spend", -amount, now, now, pack_id=pack_id,
               ticket_id=ticket.id, time_entry_id=entry.id, note=note[:300])
        for pack_id, amount in taken
    ]  # fmt: skip
    if missing:
        booked.append(_entry(session, org_id, "overdraft", -missing, now, now,
                             ticket_id=ticket.id, time_entry_id=entry.id,
                             note=(note + ", beyond the balance")[:300]))  # fmt: skip
    session.flush()
    return Charge(credits, tuple(booked), before.total, before.total - credits)


def reverse_entry(session: Session, entry_id: int, now: datetime, why: str) -> CreditEntry:
    """Correct one spend (time logged by mistake): a reversing entry into its pack."""
    entry = session.get(CreditEntry, entry_id)
    if entry is None or entry.kind not in ("spend", "overdraft"):
        raise CreditError(f"no spend #{entry_id} (see 'mailgate credits statement ORG')")
    _lock(session, entry.organisation_id)
    done = session.scalar(select(CreditEntry.id).where(CreditEntry.reverses_id == entry_id))
    if done is not None:
        raise CreditError(f"spend #{entry_id} was already reversed by #{done}")
    reversal = _entry(session, entry.organisation_id, "reversal", -entry.credits, now, now,
                      pack_id=entry.pack_id, ticket_id=entry.ticket_id, reverses_id=entry.id,
                      note=f"{why} (reverses #{entry.id})"[:300])  # fmt: skip
    session.flush()
    _give_back_repayments(session, entry.organisation_id, now)
    return reversal


def reverse_ticket(session: Session, ticket: Ticket, now: datetime, why: str) -> list[CreditEntry]:
    """Give back every credit spent on a ticket (a confirmed bug): one reversing
    entry per spend not yet reversed, into the pack it came from."""
    _lock(session, ticket.organisation_id)
    reversed_ids = select(CreditEntry.reverses_id).where(CreditEntry.reverses_id.is_not(None))
    spends = session.scalars(
        select(CreditEntry).where(
            CreditEntry.ticket_id == ticket.id,
            CreditEntry.kind.in_(("spend", "overdraft")),
            CreditEntry.id.not_in(reversed_ids),
        )
    ).all()
    booked = [
        _entry(session, ticket.organisation_id, "reversal", -spend.credits, now, now,
               pack_id=spend.pack_id, ticket_id=ticket.id, reverses_id=spend.id,
               note=f"{why} (reverses #{spend.id})"[:300])
        for spend in spends
    ]  # fmt: skip
    session.flush()
    return booked + _give_back_repayments(session, ticket.organisation_id, now)


def statement(
    session: Session, org_id: str, start: datetime | None, end: datetime | None, now: datetime
) -> Statement:
    """Entries with `start <= at < end` dated up to `now` (a pack activated later enters
    on its day, as in the balance), the balance before and after, totals per kind."""
    opening = 0
    if start is not None:
        opening = int(
            session.scalar(
                select(func.coalesce(func.sum(CreditEntry.credits), 0)).where(
                    CreditEntry.organisation_id == org_id,
                    CreditEntry.at < start,
                    CreditEntry.at <= now,
                )
            )
            or 0
        )
    query = (
        select(CreditEntry, Ticket.number)
        .outerjoin(Ticket, Ticket.id == CreditEntry.ticket_id)
        .where(CreditEntry.organisation_id == org_id, CreditEntry.at <= now)
    )
    if start is not None:
        query = query.where(CreditEntry.at >= start)
    if end is not None:
        query = query.where(CreditEntry.at < end)
    running, lines, totals = opening, [], {}
    for e, number in session.execute(query.order_by(CreditEntry.at, CreditEntry.id)):
        running += e.credits
        totals[e.kind] = totals.get(e.kind, 0) + e.credits
        lines.append({
            "id": e.id, "at": e.at.isoformat(), "kind": e.kind, "credits": e.credits,
            "balance": running, "pack": e.pack_id, "ticket": number,
            "reverses": e.reverses_id, "note": e.note,
        })  # fmt: skip
    return Statement(org_id, start, end, opening, lines, running, totals)


def shortfall(
    session: Session,
    settings: Credits,
    ticket: Ticket,
    minutes: Sequence[int],
    *,
    urgent: bool,
    bug: bool,
    now: datetime,
) -> str | None:
    """Why these time entries cannot be charged (too little credit, no overdraft), or None.

    Checked before a staff mail's commands are applied, under the same lock the
    charge takes, so the mail is refused as a whole instead of half applied."""
    org_id = ticket.organisation_id
    if not settings.enabled or settings.overdraft_for(org_id):
        return None
    _lock(session, org_id)
    current = settled_balance(session, settings, org_id, now)
    needed = sum(
        cost(m, urgent=urgent, bug=bug, urgent_multiplier=settings.urgent_multiplier)
        for m in minutes
    )
    if not current.on_credit or needed <= current.spendable:
        return None
    return (
        f"/spend needs {needed} credit(s) and {org_id} has {current.spendable} left; "
        f"nothing was applied (a pack: mailgate credits add {org_id} PACK)"
    )
