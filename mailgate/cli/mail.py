"""Mail in by hand: `ingest` (an MTA pipe, an import), `explain`, `rules test`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sqlalchemy import select

from mailgate.cli.common import (
    EX_OK,
    EX_TEMPFAIL,
    CommandError,
    human,
    load_app,
    print_json,
    send_queued,
)
from mailgate.config import ConfigError


def cmd_ingest(args: argparse.Namespace) -> int:
    from mailgate.checks import templates_dir_problem
    from mailgate.intake.pipe import NotAMailbox, read_messages
    from mailgate.pipeline.process import TemporaryFailure, process

    app = load_app(args)
    # Every stored mail is answered from the templates: without their folder each
    # one would fail at its first render, so say it once, as for the rules.
    if problem := templates_dir_problem(app.settings):
        raise ConfigError([problem])
    status = EX_OK
    try:
        items = read_messages(args.files, mbox=args.mbox, maildir=args.maildir,
                              sender=args.sender, recipients=args.recipient)  # fmt: skip
        for item in items:
            try:
                result = process(app, item.raw, item.envelope)
            except TemporaryFailure as exc:
                status = EX_TEMPFAIL
                _print_outcome(args, item.label, {"outcome": "tempfail", "reason": str(exc),
                                                  "ticket": None, "message_id": None})  # fmt: skip
                continue
            _print_outcome(args, item.label, result.as_dict())
    except BrokenPipeError:  # `ingest --mbox big.mbox | head`: what follows was not read
        raise CommandError("output closed (broken pipe): stopped, the rest of the input "
                           "was not processed") from None  # fmt: skip
    except OSError as exc:
        raise CommandError(f"cannot read {exc.filename or 'input'}: {exc.strerror}") from None
    except NotAMailbox as exc:
        raise CommandError(str(exc)) from None
    if not args.no_send:
        send_queued(app)
    return status


def _print_outcome(args: argparse.Namespace, label: str, result: dict[str, Any]) -> None:
    if args.json:
        print_json({"source": label, **result})
    else:
        ticket = result.get("ticket") or "-"
        print(f"{label}: {result['outcome']} {ticket} {result['reason']}")


def cmd_explain(args: argparse.Namespace) -> int:
    from mailgate.pipeline.message import Envelope
    from mailgate.pipeline.process import process

    # The directory as ingest would see it: on a fresh install, before any
    # ingest, the admins would otherwise be strangers. Nothing about the mail
    # is written.
    app = load_app(args)
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    result = process(app, raw, Envelope(source="explain"), dry_run=True)
    shown = result.as_dict()
    del shown["ingest_id"]  # of a record rolled back with everything else
    if args.json:
        print_json(shown)
        return EX_OK
    for key, value in shown.items():
        if key == "sla" and value:
            value = ", ".join(f"{kind} due {due}" for kind, due in value.items())
        if key == "rules" and value:
            value = ", ".join(f"{name} {human(v, '; ')}" for name, v in value.items())
        print(f"{key:11} {value if value is not None else '-'}")
    return EX_OK


def cmd_rules_test(args: argparse.Namespace) -> int:
    from mailgate.pipeline.parse import parse_message
    from mailgate.pipeline.process import classify_mail
    from mailgate.store.models import Contact

    app = load_app(args)  # the sender's role and organisation as the directory says today
    try:
        msg = parse_message(Path(args.file).read_bytes())
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    with app.sessions() as session:
        # A stranger gets no ticket, but the rules can still be tried on the text.
        contact = session.scalar(select(Contact).where(Contact.email == msg.sender))
        org = contact.organisation if contact else None
        result = classify_mail(app, msg, org, contact.role if contact else None,
                               msg.date or app.clock())  # fmt: skip
    sources = {rule.name: rule.source for rule in app.rules.rules}
    data = {
        **result.as_dict(),
        "matched": [{"rule": name, "source": sources[name]} for name in result.matched],
        "why": result.why,
        "organisation": org.id if org else None,
    }
    if args.json:
        print_json(data)
        return EX_OK
    for n, match in enumerate(data["matched"], 1):
        print(f"{n}. {match['rule']}  ({match['source']})")
    if not data["matched"]:
        print("no rule matched")
    for key in ("priority", "urgent", "level", "assignee", "group", "tags", "why"):
        print(f"{key:9} {human(data[key])}")
    return EX_OK
