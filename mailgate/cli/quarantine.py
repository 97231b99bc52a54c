"""Mail held for an operator: `quarantine`."""

from __future__ import annotations

import argparse
import os
import sys

from mailgate.cli.common import (
    EX_OK,
    EX_PROBLEM,
    CommandError,
    load_app,
    print_json,
    print_table,
    send_queued,
)


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from mailgate.intake.quarantine import held

    rows = held(load_app(args, sync_directory=False), limit=args.limit)
    if args.json:
        print_json([r.as_dict() for r in rows])
    elif rows:
        print_table([[str(r.id), r.received_at.isoformat()[:16], r.source, r.sender or "-",
                      r.subject[:40], r.reason[:60]] for r in rows],
                    ["ID", "RECEIVED (UTC)", "SOURCE", "FROM", "SUBJECT", "REASON"])  # fmt: skip
    else:
        print("quarantine empty")
    return EX_OK


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    from mailgate.intake.quarantine import NotQuarantined, one

    try:
        mail, raw = one(load_app(args, sync_directory=False), args.id)
    except NotQuarantined as exc:
        raise CommandError(str(exc)) from None
    if args.raw:
        if raw is None:
            raise CommandError(f"quarantined mail #{args.id}: its raw file is missing")
        sys.stdout.buffer.write(raw)
        return EX_OK
    for label, value in (("id", mail.id), ("received", mail.received_at.isoformat()),
                         ("source", mail.source), ("from", mail.sender or "-"),
                         ("subject", mail.subject), ("message-id", mail.message_id or "-"),
                         ("size", f"{mail.size} bytes" if mail.size is not None else "missing"),
                         ("reason", mail.reason)):  # fmt: skip
        print(f"{label + ':':12}{value}")
    if raw is not None:
        head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0][:8192]
        print("\n" + head.decode("utf-8", "replace"))
    return EX_OK


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    from mailgate.intake.quarantine import NotQuarantined, release

    app = load_app(args)
    failed = False
    for record_id in args.ids:
        try:
            result = release(app, record_id)
        except NotQuarantined as exc:
            print(f"#{record_id}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"#{record_id}: {result.outcome} {result.ticket or '-'} ({result.reason})")
    if not args.no_send:
        send_queued(app)
    return EX_PROBLEM if failed else EX_OK


def _operator() -> str:
    """Who runs the command: the login behind sudo (`sudo -u mailgate mailgate …`)."""
    import getpass

    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (a container)
        return f"uid {os.getuid()}"


def cmd_quarantine_delete(args: argparse.Namespace) -> int:
    from mailgate.intake.quarantine import NotQuarantined, delete

    app = load_app(args, sync_directory=False)
    failed = False
    for record_id in args.ids:
        try:
            delete(app, record_id, now=app.clock(), by=_operator())
        except NotQuarantined as exc:
            print(f"#{record_id}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"#{record_id}: deleted")
    return EX_PROBLEM if failed else EX_OK
