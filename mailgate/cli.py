"""The `mailgate` command line.

Errors an operator can fix are printed as one line each (file, key, what to
do) with exit status 1; `ingest` exits 75 (EX_TEMPFAIL) whenever a message
could not be stored, so that an MTA keeps it and retries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.clock import Clock, system_clock
from mailgate.config import ConfigError, Settings, config_path, load_settings
from mailgate.observability import set_log_key, setup_logging
from mailgate.outbound.outbox import STATUSES as OUTBOX_STATUSES
from mailgate.store.db import SchemaError, unavailable
from mailgate.tickets import repository as repo
from mailgate.tickets.lifecycle import STATUSES as TICKET_STATUSES

EX_OK, EX_PROBLEM, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78
ACT_AT = "act as at this time, with a zone: now or earlier (a catch-up), never later"
T = TypeVar("T")

log = logging.getLogger("mailgate")


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit 1 (78 from `run`)."""


def main(argv: Sequence[str] | None = None, *, clock: Clock = system_clock) -> int:
    """Run one command; `clock` is what "now" means to it (tests pass their own)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.clock = clock
    args.config = getattr(args, "config", None)
    args.verbose = getattr(args, "verbose", False)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EX_USAGE
    # The daemon logs every decision (INFO) for the journal; one-shot commands
    # print their results and log only problems unless -v.
    setup_logging(
        getattr(args, "log_format", "text"),
        args.verbose,
        level=logging.INFO if args.handler is cmd_run else logging.WARNING,
    )
    # `ingest` answers an MTA: anything but 0 or 75 (EX_TEMPFAIL) makes it
    # bounce the mail, so whatever stops it is "try again later". `run` tells
    # systemd which failures a restart cannot mend: a setting, a port taken by
    # another program, an outdated schema exit 78 (EX_CONFIG, which the unit's
    # RestartPreventExitStatus names); a database not up yet exits 75, restarted.
    failed = EX_TEMPFAIL if args.handler is cmd_ingest else EX_PROBLEM
    misconfigured = EX_CONFIG if args.handler is cmd_run else failed
    unreachable = EX_TEMPFAIL if args.handler is cmd_run else failed
    try:
        return int(args.handler(args) or EX_OK)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return misconfigured
    except (CommandError, SchemaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return misconfigured
    except DBAPIError as exc:  # down, locked, or its disk full, before any message
        print(f"error: {unavailable(exc)}", file=sys.stderr)
        return unreachable
    except BrokenPipeError:
        return EX_OK
    except Exception:
        if args.handler is not cmd_ingest:
            raise
        log.exception("ingest stopped by an internal error; the mail stays with the MTA")
        return EX_TEMPFAIL


def build_parser() -> argparse.ArgumentParser:
    # The common options are accepted before and after the command. SUPPRESS
    # keeps a command's parser from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="settings file (default: $MAILGATE_CONFIG or ./settings.yaml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description="Email-driven support-ticket intake.",
        parents=[common],
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str,
                parent: Any = sub) -> argparse.ArgumentParser:  # fmt: skip
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(handler=handler)
        return p

    def group(name: str, help: str) -> argparse.ArgumentParser:
        """A command with actions (`tickets list`); the common options go anywhere."""
        return sub.add_parser(name, help=help, description=help, parents=[common])

    run = command("run", cmd_run,
                  "run the daemon: SMTP and/or IMAP intake, outbox sender, scheduler")  # fmt: skip
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    command("check", cmd_check, "validate settings, directory, rules, templates and database, "
            "and reach the relay and IMAP servers")  # fmt: skip

    db = group("db", "database schema").add_subparsers(metavar="ACTION")
    command("upgrade", cmd_db_upgrade, "apply schema migrations", db)

    ingest = command("ingest", cmd_ingest, "process mail from files, stdin, mbox or Maildir")
    ingest.add_argument("files", nargs="*", metavar="FILE", help="messages; '-' or none: stdin")
    kind = ingest.add_mutually_exclusive_group()
    kind.add_argument("--mbox", action="store_true", help="FILEs are mbox files")
    kind.add_argument("--maildir", action="store_true", help="FILEs are Maildir folders")
    ingest.add_argument("--sender", help="envelope sender (MTA pipe: ${sender})")
    ingest.add_argument("--recipient", action="append", default=[], help="envelope recipient")
    ingest.add_argument("--no-send", action="store_true", help="leave queued mail to the daemon")
    ingest.add_argument("--json", action="store_true", help="one JSON object per message")

    rules = group("rules", "priority rules").add_subparsers(metavar="ACTION")
    rules_test = command("test", cmd_rules_test, "which rules match a mail, and what they set",
                         rules)  # fmt: skip
    rules_test.add_argument("file", metavar="FILE.eml")
    rules_test.add_argument("--json", action="store_true")

    explain = command("explain", cmd_explain, "dry run: what would happen to this mail")
    explain.add_argument("file", metavar="FILE.eml")
    explain.add_argument("--json", action="store_true")

    tickets = group("tickets", "read tickets").add_subparsers(metavar="ACTION")
    tl = command("list", cmd_tickets_list, "list tickets", tickets)
    tl.add_argument("--status", choices=TICKET_STATUSES)
    tl.add_argument("--org", metavar="ORG")
    tl.add_argument("--limit", type=int, default=100)
    tl.add_argument("--json", action="store_true")
    ts = command("show", cmd_tickets_show, "one ticket and its articles", tickets)
    ts.add_argument("number")
    ts.add_argument("--json", action="store_true")
    sweep = command(
        "sweep", cmd_tickets_sweep,
        "send due waiting reminders, resolve and close tickets (the daemon does it every 5 min)",
        tickets,
    )  # fmt: skip
    sweep.add_argument("--now", metavar="ISO", help=ACT_AT)

    sla = group("sla", "SLA clocks").add_subparsers(metavar="ACTION")
    sla_sweep = command(
        "sweep", cmd_sla_sweep,
        "send due SLA reminders and breach notices (the daemon does it every minute)", sla,
    )  # fmt: skip
    sla_sweep.add_argument("--now", metavar="ISO", help=ACT_AT)
    report = command("report", cmd_sla_report, "targets met and breached, per priority", sla)
    report.add_argument("--org", help="one organisation's tickets")
    report.add_argument("--from", dest="start", metavar="DATE", help="tickets created from (ISO)")
    report.add_argument("--to", dest="end", metavar="DATE", help="...until before (ISO)")
    report.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    report.add_argument("--json", action="store_true")

    directory = group("directory", "organisations, contacts, staff")
    dsub = directory.add_subparsers(metavar="ACTION")
    ds = command("sync", cmd_directory_sync, "upsert the directory from YAML or CSV", dsub)
    ds.add_argument("file", nargs="?", help="default: the settings' directory file")
    ds.add_argument(
        "--force", action="store_true", help="apply it even past directory_max_deactivations"
    )

    outbox = group("outbox", "outbound queue").add_subparsers(metavar="ACTION")
    ol = command("list", cmd_outbox_list, "list outbound mail", outbox)
    ol.add_argument("--status", choices=OUTBOX_STATUSES)
    ol.add_argument("--limit", type=int, default=100)
    ol.add_argument("--json", action="store_true")
    orr = command("retry", cmd_outbox_retry, "requeue failed or dead mail", outbox)
    orr.add_argument("ids", nargs="*", type=int, metavar="ID", help="default: all of them")
    command("send", cmd_outbox_send, "send what is due now", outbox)

    credits = group("credits", "prepaid support credit").add_subparsers(metavar="ACTION")
    ca = command("add", cmd_credits_add, "record a pack an organisation bought", credits)
    ca.add_argument("org", metavar="ORG")
    ca.add_argument("pack", metavar="PACK", help="a name from settings credits.packs")
    ca.add_argument("--activated", metavar="DATE", help="default: now (ISO date or time)")
    ca.add_argument("--reference", default="", help="order or invoice number")
    cb = command("balance", cmd_credits_balance, "credit left, per pack", credits)
    cb.add_argument("org", metavar="ORG")
    cb.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    cb.add_argument("--json", action="store_true")
    cst = command("statement", cmd_credits_statement, "the ledger, with a running balance",
                  credits)  # fmt: skip
    cst.add_argument("org", metavar="ORG")
    cst.add_argument("--from", dest="start", metavar="DATE")
    cst.add_argument("--to", dest="end", metavar="DATE")
    cst.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    form = cst.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true")
    form.add_argument("--csv", action="store_true")
    csp = command("spend", cmd_credits_spend, "record time on a ticket and charge it", credits)
    csp.add_argument("ticket", metavar="TICKET")
    csp.add_argument("duration", metavar="DURATION", help="45m, 1h30, 1.5h, …")
    csp.add_argument("--by", default="operator", help="who did the work (default: operator)")
    csp.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    crv = command("reverse", cmd_credits_reverse,
                  "correct a spend: a reversing entry gives its credits back", credits)  # fmt: skip
    crv.add_argument("entry", type=int, metavar="ENTRY", help="the spend's id in the statement")
    crv.add_argument("--note", default="corrected by an operator")
    csw = command("sweep", cmd_credits_sweep,
                  "book expiries and send expiry notices (the daemon does it hourly)",
                  credits)  # fmt: skip
    csw.add_argument("--now", metavar="ISO", help=ACT_AT)

    quarantine = group("quarantine", "mail held for an operator")
    qsub = quarantine.add_subparsers(metavar="ACTION")
    ql = command("list", cmd_quarantine_list, "held mail, newest first", qsub)
    ql.add_argument("--limit", type=int, default=100)
    ql.add_argument("--json", action="store_true")
    qs = command("show", cmd_quarantine_show, "one held mail: why, and its headers", qsub)
    qs.add_argument("id", type=int)
    qs.add_argument("--raw", action="store_true", help="print the whole raw mail")
    qr = command("release", cmd_quarantine_release,
                 "run held mail through the pipeline again (after a fix)", qsub)  # fmt: skip
    qr.add_argument("ids", nargs="+", type=int, metavar="ID")
    qr.add_argument("--no-send", action="store_true", help="leave queued mail to the daemon")
    qd = command("delete", cmd_quarantine_delete, "drop held mail (the record stays)", qsub)
    qd.add_argument("ids", nargs="+", type=int, metavar="ID")

    retention = group("retention", "personal data kept only as long as needed")
    rsub = retention.add_subparsers(metavar="ACTION")
    rr = command("run", cmd_retention_run,
                 "anonymise closed tickets past retention, delete old quarantined mail",
                 rsub)  # fmt: skip
    rr.add_argument("--dry-run", action="store_true", help="say what it would do, change nothing")
    rr.add_argument("--now", metavar="ISO", help=ACT_AT + "; any time with --dry-run")

    gdpr = group("gdpr", "one person's data: export or erase")
    gsub = gdpr.add_subparsers(metavar="ACTION")
    ge = command("export", cmd_gdpr_export, "everything stored about a person", gsub)
    ge.add_argument("email", metavar="EMAIL")
    ge.add_argument("--format", choices=("json", "zip"), default="json")
    ge.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    gr = command("erase", cmd_gdpr_erase, "remove a person from everything stored", gsub)
    gr.add_argument("email", metavar="EMAIL")
    gr.add_argument("--yes", action="store_true", help="really erase (without: say what it would)")
    gh = command("log-hash", cmd_gdpr_log_hash,
                 "the keyed hash that stands for an address in the logs", gsub)  # fmt: skip
    gh.add_argument("email", metavar="EMAIL")
    return parser


# -- helpers ---------------------------------------------------------------


def load_app(args: argparse.Namespace, *, sync_directory: bool = True) -> App:
    settings = load_settings(args.config)
    app = App(settings, clock=args.clock)
    set_log_key(app.log_key)
    app.rules  # noqa: B018 - a broken rule file stops here, listed, before any mail is touched
    if sync_directory:
        sync_directory_if_changed(app)
    return app


# Changed whenever the same directory file is stored differently, so that the
# first start of the new version syncs it again: "2", addresses at
# internationalised domains in IDNA (A-labels), as intake compares senders;
# "3", contacts the file lists as inactive told apart from those gone from it.
DIRECTORY_READING = b"3\n"


def sync_directory_if_changed(app: App) -> str | None:
    """Sync the settings' directory file when its content changed since the last sync."""
    from mailgate.directory import load_directory, refuse_mass_deactivation, sync_directory
    from mailgate.sla.clocks import retarget
    from mailgate.store.state import get_state, set_state

    if app.settings.directory is None:
        return None
    path = app.settings.path(app.settings.directory)
    if not path.exists():
        raise ConfigError([f"{app.settings.source}: directory: {path} not found"])
    import hashlib

    digest = hashlib.sha256(DIRECTORY_READING + path.read_bytes()).hexdigest()
    with app.sessions.begin() as session:
        if get_state(session, "directory.sha256") == digest:
            return None
        report = sync_directory(session, load_directory(path))
        refuse_mass_deactivation(path, report, app.settings.directory_max_deactivations)
        retarget(app.sla, session, report.replanned, app.clock())
        set_state(session, "directory.sha256", digest)
    log.info("directory %s: %s", path, report)
    return str(report)


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, default=str))


def print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- commands --------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from mailgate.daemon import cmd_run as run_daemon  # asyncio parts load only when run

    return run_daemon(args)


def cmd_check(args: argparse.Namespace) -> int:
    from mailgate.checks import run_checks

    problems = run_checks(config_path(args.config))
    for line in problems:
        print(f"error: {line}")
    if not problems:
        print(
            "ok: settings, directory, rules, templates, database, files and folders, relay "
            "and IMAP checked"
        )
    return EX_PROBLEM if problems else EX_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from mailgate.store.db import current_revision, make_engine, upgrade

    settings = load_settings(args.config)
    engine = make_engine(settings.database_url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"database at {current_revision(engine)} (was {before or 'empty'})")
    return EX_OK


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
        _send_queued(app)
    return status


def _print_outcome(args: argparse.Namespace, label: str, result: dict[str, Any]) -> None:
    if args.json:
        print_json({"source": label, **result})
    else:
        ticket = result.get("ticket") or "-"
        print(f"{label}: {result['outcome']} {ticket} {result['reason']}")


def _send_queued(app: App) -> None:
    try:
        app.send_outbox()
    except Exception as exc:  # noqa: BLE001 - mail stays queued for the daemon
        log.warning("queued mail not sent now (the daemon will retry): %s", exc)


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
        print(f"{key:9} {data[key] if data[key] not in (None, []) else '-'}")
    return EX_OK


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
            value = ", ".join(f"{name} {_listed(v)}" for name, v in value.items())
        print(f"{key:11} {value if value is not None else '-'}")
    return EX_OK


def _listed(value: object) -> str:
    if isinstance(value, list):
        return "; ".join(value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


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
            ["NUMBER", "STATUS", "PRIO", "ORG", "REQUESTER", "SUBJECT", "UPDATED"],
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
        print(f"{key:13} {data[key]}")
    if data["time_spent"]:
        total = sum(t["minutes"] for t in data["time_spent"])
        print(f"{'time spent':13} {total} min in {len(data['time_spent'])} entries")
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

    return _sweep_once(args, sweep)


def cmd_sla_sweep(args: argparse.Namespace) -> int:
    from mailgate.sla.sweep import sweep

    return _sweep_once(args, sweep)


def _sweep_once(args: argparse.Namespace, sweep: Callable[[App, datetime], object]) -> int:
    """One run of a scheduled sweep, for cron or a test clock; then send what it queued."""
    app = load_app(args, sync_directory=False)
    print(sweep(app, _acting_at(args.now, app)))
    _send_queued(app)
    return EX_OK


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


def cmd_directory_sync(args: argparse.Namespace) -> int:
    from mailgate.directory import load_directory, refuse_mass_deactivation, sync_directory
    from mailgate.sla.clocks import retarget

    app = load_app(args, sync_directory=False)
    if args.file:
        path = Path(args.file)
    elif app.settings.directory:
        path = app.settings.path(app.settings.directory)
    else:
        raise CommandError("no FILE given and no 'directory' in the settings")
    directory = load_directory(path)
    with app.sessions.begin() as session:
        report = sync_directory(session, directory)
        if not args.force:
            refuse_mass_deactivation(path, report, app.settings.directory_max_deactivations)
        retarget(app.sla, session, report.replanned, app.clock())
    print(f"{path}: {report}")
    return EX_OK


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
        print_table([[str(r["id"]), r["status"], r["kind"], r["ticket"] or "-", r["to"],
                      str(r["attempts"]), r["next_attempt_at"][:16], (r["last_error"] or "")[:40]]
                     for r in rows],
                    ["ID", "STATUS", "KIND", "TICKET", "TO", "TRIES", "NEXT", "ERROR"])  # fmt: skip
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
    _send_queued(app)
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
        return statement(session, args.org, start, end, now)

    found = _settled(args, read)
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
        print_table([[str(e["id"]), e["at"][:16], e["kind"], f"{e['credits']:+d}",
                      str(e["balance"]), e["ticket"] or "-", e["note"][:50]]
                     for e in found.entries],
                    ["ID", "AT", "KIND", "CREDITS", "BALANCE", "TICKET", "NOTE"])  # fmt: skip
        print(f"closing balance {found.closing}")
    return EX_OK


STATEMENT_COLUMNS = ("id", "at", "kind", "credits", "balance", "pack", "ticket", "reverses", "note")


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
    now = _acting_at(args.now, app)
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
    _send_queued(app)
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

    return _sweep_once(args, sweep)


def _acting_at(value: str | None, app: App) -> datetime:
    """The --now of a command that acts (sends, books, closes, anonymises), or the
    clock. Never later than the clock: what it did then would be done for good,
    before its time (a breach notice for a deadline not reached, credits expired
    while still valid, a ticket anonymised early)."""
    pretend, now = parse_now(value), app.clock()
    if pretend is not None and pretend > now:
        raise CommandError(f"--now {pretend.isoformat()} is later than now ({now.isoformat()}): "
                           "what this command does would stay done; give the present or a "
                           "past time")  # fmt: skip
    return pretend or now


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


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from mailgate.intake.quarantine import held

    rows = held(load_app(args, sync_directory=False), limit=args.limit)
    if args.json:
        print_json([r.as_dict() for r in rows])
    elif rows:
        print_table([[str(r.id), r.received_at.isoformat()[:16], r.source, r.sender or "-",
                      r.subject[:40], r.reason[:60]] for r in rows],
                    ["ID", "RECEIVED", "SOURCE", "FROM", "SUBJECT", "REASON"])  # fmt: skip
    else:
        print("quarantine empty")
    return EX_OK


def cmd_retention_run(args: argparse.Namespace) -> int:
    from mailgate.privacy.retention import run

    app = load_app(args, sync_directory=False)
    # A dry run changes nothing: it may look at any time.
    now = (parse_now(args.now) or app.clock()) if args.dry_run else _acting_at(args.now, app)
    report = run(app, now, dry_run=args.dry_run)
    if args.dry_run:
        print(f"would anonymise {len(report.tickets)} ticket(s)"
              + (f": {', '.join(report.tickets)}" if report.tickets else "")
              + f"; would delete {report.records} received and {report.outbox} sent mail(s)"
              " on no ticket")  # fmt: skip
    else:
        print(report)
    return EX_OK


def cmd_gdpr_export(args: argparse.Namespace) -> int:
    from mailgate.privacy.gdpr import UnknownPerson, export, export_zip

    try:
        data, files = export(load_app(args, sync_directory=False), _person(args.email))
    except UnknownPerson as exc:
        raise CommandError(str(exc)) from None
    if args.format == "zip":
        if not args.output and sys.stdout.isatty():
            raise CommandError("a zip archive is not for the terminal: give -o FILE")
        content = export_zip(data, files)
    else:
        content = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
    if not args.output:
        sys.stdout.buffer.write(content)
        return EX_OK
    try:  # personal data: owner-only, and never through a link planted at that path
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as out:
            out.write(content)
    except OSError as exc:
        raise CommandError(f"cannot write {args.output}: {exc.strerror}") from None
    return EX_OK


def cmd_gdpr_erase(args: argparse.Namespace) -> int:
    from mailgate.privacy.gdpr import UnknownPerson, erase

    app = load_app(args, sync_directory=False)
    try:
        report = erase(app, _person(args.email), app.clock(), dry_run=not args.yes)
    except UnknownPerson as exc:
        raise CommandError(str(exc)) from None
    if not args.yes:
        print(f"would erase: {report}\nrun again with --yes to erase")
        return EX_PROBLEM
    print(f"erased: {report}")
    if app.settings.directory is not None:
        from mailgate.directory import load_directory

        listed = load_directory(app.settings.path(app.settings.directory))
        if any(c.email.lower() == args.email.lower() for o in listed.organisations
               for c in o.contacts):  # fmt: skip
            print(f"warning: {app.settings.directory} still lists this address: remove it,"
                  " or the next directory sync brings the contact back",
                  file=sys.stderr)  # fmt: skip
    return EX_OK


def _person(email: str) -> str:
    """The address as the directory and intake store it (lower case, an
    internationalised domain in IDNA), whichever way the operator typed it."""
    from mailgate.config import valid_address

    try:
        return valid_address(email)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def cmd_gdpr_log_hash(args: argparse.Namespace) -> int:
    from mailgate.observability import address_hasher

    print(address_hasher(load_app(args, sync_directory=False).log_key)(_person(args.email)))
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
        _send_queued(app)
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


def parse_now(value: str | None, option: str = "--now") -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        example = "2026-11-23T09:00+01:00"
        raise CommandError(f"{option} {value}: not an ISO 8601 time, e.g. {example}") from None
    if moment.tzinfo is None:
        raise CommandError(f"{option} {value}: give a time zone, e.g. {value}+00:00")
    return moment


def parse_day(value: str | None, option: str) -> datetime | None:
    """A report bound: a date (midnight UTC) or a time with its zone."""
    if value is not None and len(value) == 10:
        value += "T00:00+00:00"
    return parse_now(value, option)


__all__ = ["main", "Settings"]
