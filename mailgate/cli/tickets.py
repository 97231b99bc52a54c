"""Tickets and their SLA: `tickets`, `sla`."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import select

from mailgate.cli.common import (
    EX_OK,
    CommandError,
    human,
    load_app,
    parse_day,
    parse_now,
    print_json,
    print_table,
    sweep_once,
)
from mailgate.tickets import repository as repo


def cmd_tickets_list(args: argparse.Namespace) -> int:
    from mailgate.store.models import Organisation, Ticket

    app = load_app(args, sync_directory=False)
    with app.sessions() as session:
        query = select(Ticket).order_by(Ticket.id.desc()).limit(args.limit)
        if args.status:
            query = query.where(Ticket.status == args.status)
        if args.org:
            if session.get(Organisation, args.org) is None:
                raise CommandError(f"no organisation {args.org!r} in the directory")
            query = query.where(Ticket.organisation_id == args.org)
        tickets = list(session.scalars(query))
        rows = [_ticket_summary(t) for t in tickets]
    if args.json:
        print_json(rows)
    elif rows:
        print_table(
            [[r["number"], r["status"], r["priority"], r["organisation"], r["requester"] or "-",
              r["subject"][:50], r["updated_at"][:16]] for r in rows],
            ["NUMBER", "STATUS", "PRIO", "ORG", "REQUESTER", "SUBJECT", "UPDATED (UTC)"],
        )  # fmt: skip
    else:
        print("no tickets")
    return EX_OK


def _ticket_summary(ticket: Any) -> dict[str, Any]:
    return {
        "number": ticket.number,
        "status": ticket.status,
        "priority": ticket.priority,
        "urgent": ticket.urgent,
        "level": ticket.level,
        "assignee": ticket.assignee.email if ticket.assignee else None,
        "group": ticket.group,
        "tags": list(ticket.tags),
        "organisation": ticket.organisation_id,
        "requester": ticket.requester.email if ticket.requester else None,
        "cc": list(ticket.cc),
        "subject": ticket.subject,
        "created_at": ticket.created_at.isoformat(),
        "updated_at": ticket.updated_at.isoformat(),
    }


def cmd_tickets_show(args: argparse.Namespace) -> int:
    from mailgate.store.models import Ticket

    app = load_app(args, sync_directory=False)
    with app.sessions() as session:
        ticket = session.scalar(select(Ticket).where(Ticket.number == args.number.upper()))
        if ticket is None:
            raise CommandError(f"no ticket {args.number}")
        data = _ticket_summary(ticket)
        data["articles"] = [_article_summary(a) for a in ticket.articles]
        data["history"] = [_event_summary(e) for e in repo.events_of(session, ticket.id)]
        data["time_spent"] = [_time_summary(t) for t in repo.time_entries_of(session, ticket.id)]
    if args.json:
        print_json(data)
        return EX_OK
    for key in ("number", "subject", "status", "priority", "urgent", "level", "assignee",
                "group", "tags", "organisation", "requester", "cc", "created_at"):  # fmt: skip
        print(f"{key:13} {human(data[key])}")
    if data["time_spent"]:
        total = sum(t["minutes"] for t in data["time_spent"])
        entries = len(data["time_spent"])
        print(f"{'time spent':13} {total} min in {entries} entr{'y' if entries == 1 else 'ies'}")
    for event in data["history"]:
        who = event["actor"] or event["actor_kind"]
        print(f"  {event['at'][:16]} {event['field']}: {event['old'] or '-'} -> {event['new']}"
              f"  by {who}: {event['reason']}")  # fmt: skip
    for article in data["articles"]:
        print(f"\n--- #{article['id']} {article['created_at'][:16]} {article['direction']} "
              f"{article['author_kind']} {article['visibility']} {article['author'] or ''}"
              + (f" [{article['delivery']}]" if article["delivery"] else ""))  # fmt: skip
        print(f"Subject: {article['subject']}")
        for name in article["attachments"]:
            print(f"Attachment: {name}")
        print(article["text"].rstrip()[:4000])
    return EX_OK


def _event_summary(event: Any) -> dict[str, Any]:
    return {
        "at": event.at.isoformat(),
        "actor_kind": event.actor_kind,
        "actor": event.actor,
        "field": event.field,
        "old": event.old,
        "new": event.new,
        "reason": event.reason,
    }


def _time_summary(entry: Any) -> dict[str, Any]:
    return {
        "staff": entry.staff_email,
        "minutes": entry.minutes,
        "urgent": entry.urgent,
        "at": entry.created_at.isoformat(),
    }


def _article_summary(article: Any) -> dict[str, Any]:
    return {
        "id": article.id,
        "direction": article.direction,
        "author_kind": article.author_kind,
        "author": article.author_email,
        "visibility": article.visibility,
        "message_id": article.message_id,
        "subject": article.subject,
        "text": article.text,
        "delivery": article.delivery,
        "attachments": [a.filename for a in article.attachments],
        "created_at": article.created_at.isoformat(),
    }


def cmd_tickets_sweep(args: argparse.Namespace) -> int:
    from mailgate.tickets.sweep import sweep

    return sweep_once(args, sweep)


def cmd_sla_sweep(args: argparse.Namespace) -> int:
    from mailgate.sla.sweep import sweep

    return sweep_once(args, sweep)


def cmd_sla_report(args: argparse.Namespace) -> int:
    from mailgate.sla.report import REPORTED, sla_report

    app = load_app(args, sync_directory=False)
    with app.sessions() as session:
        rows = sla_report(
            session,
            parse_now(args.now) or app.clock(),
            organisation=args.org,
            start=parse_day(args.start, "--from"),
            end=parse_day(args.end, "--to"),
        )
    if args.json:
        print_json([row.as_dict() for row in rows])
        return EX_OK

    def median(value: float | None) -> str:
        return "-" if value is None else f"{value:g} min"

    table = []
    for row in rows:
        line = [row.priority, str(row.tickets)]
        for kind in REPORTED:
            c = getattr(row, kind)
            line += [f"{c.met}/{c.breached}/{c.running}", median(c.median_minutes)]
        table.append(line)
    headers = ["priority", "tickets", "response met/breached/running", "median",
               "resolution met/breached/running", "median"]  # fmt: skip
    print_table(table, headers)
    return EX_OK
