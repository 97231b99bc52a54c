"""Prepaid support credit: `credits`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.cli.common import (
    EX_OK,
    CommandError,
    acting_at,
    load_app,
    parse_now,
    print_json,
    print_table,
    send_queued,
    sweep_once,
)

T = TypeVar("T")


STATEMENT_COLUMNS = ("id", "at", "kind", "credits", "balance", "pack", "ticket", "reverses", "note")


def cmd_credits_add(args: argparse.Namespace) -> int:
    from mailgate.credits.billing import first_valid_day, last_valid_day
    from mailgate.credits.ledger import CreditError, add_pack

    app = load_app(args)
    now = app.clock()
    try:
        with app.sessions.begin() as session:
            org = _known_org(session, args.org)
            activated = _activation(args.activated, org.timezone) or now
            row = add_pack(session, app.settings.credits, args.org, args.pack,
                           activated=activated, reference=args.reference, now=now)  # fmt: skip
            # The days `credits balance` and the customer's mails give (the
            # organisation's zone), not the expiry instant in UTC.
            first = first_valid_day(row.activated_at, org.timezone)
            last = last_valid_day(row.expires_at, org.timezone)
            summary = (f"{args.org}: pack {row.pack} (+{row.credits} credits), "
                       f"valid from {first} until {last} (pack #{row.id})")  # fmt: skip
    except CreditError as exc:
        raise CommandError(str(exc)) from None
    print(summary)
    return EX_OK


def cmd_credits_balance(args: argparse.Namespace) -> int:
    from mailgate.credits.billing import first_valid_day, last_valid_day
    from mailgate.credits.ledger import balance

    def read(session: Session, now: datetime) -> tuple[Any, str]:
        return balance(session, args.org, now), _known_org(session, args.org).timezone

    found, timezone = _settled(args, read)

    # Days as the customer's mails give them: in the organisation's time zone,
    # the last day the credits can be used.
    def listed(p: Any) -> dict[str, Any]:
        return {"id": p.id, "pack": p.pack, "remaining": p.remaining,
                "expires_at": p.expires_at.isoformat(),
                "valid_from": first_valid_day(p.activated_at, timezone).isoformat(),
                "valid_until": last_valid_day(p.expires_at, timezone).isoformat()}  # fmt: skip

    packs, later = [listed(p) for p in found.packs], [listed(p) for p in found.later]
    if args.json:
        print_json({"organisation": args.org, "balance": found.total, "packs": packs,
                    "not_active_yet": later})  # fmt: skip
        return EX_OK
    print(f"{args.org}: {found.total} credit(s)" + ("" if found.on_credit else " (no pack bought)"))
    if packs:
        print_table([[str(p["id"]), p["pack"], str(p["remaining"]), p["valid_until"]]
                     for p in packs], ["PACK", "NAME", "LEFT", "VALID UNTIL"])  # fmt: skip
    if later:
        print(f"not active yet, not in the balance: {sum(p['remaining'] for p in later)} credit(s)")
        print_table([[str(p["id"]), p["pack"], str(p["remaining"]), p["valid_from"],
                      p["valid_until"]] for p in later],
                    ["PACK", "NAME", "LEFT", "VALID FROM", "VALID UNTIL"])  # fmt: skip
    return EX_OK


def cmd_credits_statement(args: argparse.Namespace) -> int:
    import csv

    from mailgate.credits.ledger import statement

    def read(session: Session, now: datetime) -> Any:
        # Days as --activated takes them, the organisation's: November's statement
        # holds the pack activated on 1 November, not the time spent on 1 December.
        zone = _known_org(session, args.org).timezone
        start = _activation(args.start, zone, "--from")
        end = _activation(args.end, zone, "--to")
        return statement(session, args.org, start, end, now), zone

    found, zone = _settled(args, read)
    if args.json:
        print_json({"organisation": found.organisation_id, "opening": found.opening,
                    "entries": found.entries, "closing": found.closing,
                    "totals": found.totals})  # fmt: skip
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(STATEMENT_COLUMNS))
        writer.writeheader()
        writer.writerows(found.entries)
    else:
        print(f"{args.org}: opening balance {found.opening}")
        # ID: what `credits reverse ENTRY` takes.
        # Times where the organisation is, as its days are (JSON and CSV keep UTC):
        # its pack bought on 1 November read "2026-10-31T23:00" in UTC.
        print_table([[str(e["id"]), _local(e["at"], zone), e["kind"], f"{e['credits']:+d}",
                      str(e["balance"]), e["ticket"] or "-", e["note"][:50]]
                     for e in found.entries],
                    ["ID", f"AT ({zone})", "KIND", "CREDITS", "BALANCE", "TICKET",
                     "NOTE"])  # fmt: skip
        print(f"closing balance {found.closing}")
    return EX_OK


def _local(at: str, zone: str) -> str:
    return datetime.fromisoformat(at).astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")


def cmd_credits_spend(args: argparse.Namespace) -> int:
    from mailgate.credits.billing import bill_time
    from mailgate.credits.ledger import CreditError
    from mailgate.store.models import Ticket
    from mailgate.tickets.changes import record_time
    from mailgate.tickets.commands import parse_duration

    try:
        minutes = parse_duration(args.duration)
    except ValueError as exc:
        raise CommandError(f"{args.duration}: {exc}") from None
    app = load_app(args)
    now = acting_at(args.now, app)
    try:
        with app.sessions.begin() as session:
            ticket = session.scalar(select(Ticket).where(Ticket.number == args.ticket))
            if ticket is None:
                raise CommandError(f"no ticket {args.ticket} (see 'mailgate tickets list')")
            entries = record_time(session, ticket, [minutes], staff_email=args.by, now=now,
                                  article_id=None)  # fmt: skip
            (charged,) = bill_time(app, session, ticket, entries, now) or [None]
    except CreditError as exc:
        raise CommandError(str(exc)) from None
    cost = charged.credits if charged else 0
    after = f", balance {charged.balance_after}" if charged and charged.entries else ""
    print(f"{args.ticket}: {minutes} min recorded, {cost} credit(s) charged{after}")
    send_queued(app)
    return EX_OK


def cmd_credits_reverse(args: argparse.Namespace) -> int:
    from mailgate.credits.ledger import CreditError, reverse_entry

    app = load_app(args, sync_directory=False)
    try:
        with app.sessions.begin() as session:
            reversal = reverse_entry(session, args.entry, app.clock(), args.note)
            print(f"spend #{args.entry} reversed by #{reversal.id}: {reversal.credits:+d} credits")
    except CreditError as exc:
        raise CommandError(str(exc)) from None
    return EX_OK


def cmd_credits_sweep(args: argparse.Namespace) -> int:
    from mailgate.credits.billing import sweep

    return sweep_once(args, sweep)


def _settled(args: argparse.Namespace, read: Callable[[Session, datetime], T]) -> T:
    """Read an organisation's ledger after booking the expiries due now. With a
    pretend --now, what it would be then, booking nothing: the entries settling
    makes are rolled back."""
    from mailgate.credits.ledger import settle

    app = load_app(args)
    pretend = parse_now(args.now)
    now = pretend or app.clock()
    with app.sessions() as session:
        _known_org(session, args.org)
        settle(session, app.settings.credits, args.org, now)
        found = read(session, now)
        if pretend is None:
            session.commit()
        else:
            session.rollback()
        return found


def _known_org(session: Session, org_id: str) -> Any:
    from mailgate.store.models import Organisation

    org = session.get(Organisation, org_id)
    if org is None:
        raise CommandError(f"no organisation {org_id!r} in the directory")
    return org


def _activation(value: str | None, timezone: str, option: str = "--activated") -> datetime | None:
    """A date is midnight where the organisation is: its pack ends at its midnight too,
    and its statement's days are its own."""
    if value is not None and len(value) == 10:
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise CommandError(f"{option} {value}: not an ISO date, e.g. 2026-11-01") from None
        return datetime.combine(day, time(), tzinfo=ZoneInfo(timezone))
    return parse_now(value, option)
