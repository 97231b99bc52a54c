"""The outbound queue: `outbox`."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.cli.common import EX_OK, CommandError, load_app, print_json, print_table, send_queued


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from mailgate.store.models import OutboxMail

    app = load_app(args, sync_directory=False)
    with app.sessions() as session:
        query = select(OutboxMail).order_by(OutboxMail.id.desc()).limit(args.limit)
        if args.status:
            query = query.where(OutboxMail.status == args.status)
        rows = [_outbox_summary(session, r) for r in session.scalars(query)]
    if args.json:
        print_json(rows)
    elif rows:
        headers = ["ID", "STATUS", "KIND", "TICKET", "TO", "TRIES", "NEXT (UTC)", "ERROR"]
        print_table([[str(r["id"]), r["status"], r["kind"], r["ticket"] or "-", r["to"],
                      str(r["attempts"]), r["next_attempt_at"][:16], (r["last_error"] or "")[:40]]
                     for r in rows], headers)  # fmt: skip
    else:
        print("outbox empty")
    return EX_OK


def _outbox_summary(session: Session, row: Any) -> dict[str, Any]:
    from mailgate.store.models import Ticket

    ticket = session.get(Ticket, row.ticket_id) if row.ticket_id else None
    return {
        "id": row.id, "status": row.status, "kind": row.kind,
        "ticket": ticket.number if ticket else None, "to": ", ".join(row.recipients),
        "message_id": row.message_id, "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat(), "last_error": row.last_error,
    }  # fmt: skip


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    from mailgate.outbound.outbox import retry

    app = load_app(args, sync_directory=False)
    with app.sessions.begin() as session:
        queued = retry(session, args.ids or None, app.clock())
        # An id the operator named that was not queued is said, not counted away.
        left = [_not_retried(session, i) for i in dict.fromkeys(args.ids) if i not in queued]
    print(f"{len(queued)} mail(s) queued again")
    send_queued(app)
    if left:
        raise CommandError("; ".join(left))
    return EX_OK


def _not_retried(session: Session, mail_id: int) -> str:
    from mailgate.store.models import OutboxMail

    row = session.get(OutboxMail, mail_id)
    if row is None:
        return f"no outbound mail #{mail_id}"
    return f"mail #{mail_id} is {row.status}: only failed or dead mail is queued again"


def cmd_outbox_send(args: argparse.Namespace) -> int:
    app = load_app(args, sync_directory=False)
    print(f"{app.send_outbox()} mail(s) handled")
    return EX_OK
