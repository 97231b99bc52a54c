"""The `mailgate` command line: its parser and `main`; the commands are in the
modules beside this one, one per group (tickets, credits, outbox...).

Errors an operator can fix are printed as one line each (file, key, what to
do) with exit status 1; `ingest` exits 75 (EX_TEMPFAIL) whenever a message
could not be stored, so that an MTA keeps it and retries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError

from mailgate.cli.common import (
    EX_CONFIG,
    EX_OK,
    EX_PROBLEM,
    EX_TEMPFAIL,
    EX_USAGE,
    CommandError,
    log,
)
from mailgate.cli.credits import (
    cmd_credits_add,
    cmd_credits_balance,
    cmd_credits_reverse,
    cmd_credits_spend,
    cmd_credits_statement,
    cmd_credits_sweep,
)
from mailgate.cli.mail import cmd_explain, cmd_ingest, cmd_rules_test
from mailgate.cli.outbox import cmd_outbox_list, cmd_outbox_retry, cmd_outbox_send
from mailgate.cli.privacy import (
    cmd_gdpr_erase,
    cmd_gdpr_export,
    cmd_gdpr_log_hash,
    cmd_retention_run,
)
from mailgate.cli.quarantine import (
    cmd_quarantine_delete,
    cmd_quarantine_list,
    cmd_quarantine_release,
    cmd_quarantine_show,
)
from mailgate.cli.service import cmd_check, cmd_db_upgrade, cmd_directory_sync, cmd_run
from mailgate.cli.tickets import (
    cmd_sla_report,
    cmd_sla_sweep,
    cmd_tickets_list,
    cmd_tickets_show,
    cmd_tickets_sweep,
)
from mailgate.clock import Clock, system_clock
from mailgate.config import ConfigError
from mailgate.observability import setup_logging
from mailgate.outbound.outbox import STATUSES as OUTBOX_STATUSES
from mailgate.store.db import SchemaError, unavailable
from mailgate.tickets.lifecycle import STATUSES as TICKET_STATUSES

ACT_AT = "act as at this time, with a zone: now or earlier (a catch-up), never later"
JSON = "print JSON instead of text"
LIMIT = "at most this many, newest first (default: 100)"
ORG = "the organisation's id in the directory"
HELD = "the ID that `quarantine list` shows"


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
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging, with addresses in clear (not as addr: hashes)",
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
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per line (the systemd unit uses it)",
    )
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
    rules_test.add_argument("file", metavar="FILE.eml", help="one message, as received")
    rules_test.add_argument("--json", action="store_true", help=JSON)

    explain = command("explain", cmd_explain, "dry run: what would happen to this mail")
    explain.add_argument("file", metavar="FILE.eml", help="one message, as received")
    explain.add_argument("--json", action="store_true", help=JSON)

    tickets = group("tickets", "read tickets").add_subparsers(metavar="ACTION")
    tl = command("list", cmd_tickets_list, "list tickets", tickets)
    tl.add_argument("--status", choices=TICKET_STATUSES, help="only tickets in this status")
    tl.add_argument("--org", metavar="ORG", help="one organisation's tickets (its id)")
    tl.add_argument("--limit", type=int, default=100, help=LIMIT)
    tl.add_argument("--json", action="store_true", help=JSON)
    ts = command("show", cmd_tickets_show, "one ticket and its articles", tickets)
    ts.add_argument("number", metavar="NUMBER", help="tracking number, e.g. SUP-2026-000042")
    ts.add_argument("--json", action="store_true", help=JSON)
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
    report.add_argument("--json", action="store_true", help=JSON)

    directory = group("directory", "organisations, contacts, staff")
    dsub = directory.add_subparsers(metavar="ACTION")
    ds = command("sync", cmd_directory_sync, "upsert the directory from YAML or CSV", dsub)
    ds.add_argument("file", nargs="?", help="default: the settings' directory file")
    ds.add_argument(
        "--force", action="store_true", help="apply it even past directory_max_deactivations"
    )

    outbox = group("outbox", "outbound queue").add_subparsers(metavar="ACTION")
    ol = command("list", cmd_outbox_list, "list outbound mail", outbox)
    ol.add_argument("--status", choices=OUTBOX_STATUSES, help="only mail in this status")
    ol.add_argument("--limit", type=int, default=100, help=LIMIT)
    ol.add_argument("--json", action="store_true", help=JSON)
    orr = command("retry", cmd_outbox_retry, "requeue failed or dead mail", outbox)
    orr.add_argument("ids", nargs="*", type=int, metavar="ID", help="default: all of them")
    command("send", cmd_outbox_send, "send what is due now", outbox)

    credits = group("credits", "prepaid support credit").add_subparsers(metavar="ACTION")
    ca = command("add", cmd_credits_add, "record a pack an organisation bought", credits)
    ca.add_argument("org", metavar="ORG", help=ORG)
    ca.add_argument("pack", metavar="PACK", help="a name from settings credits.packs")
    ca.add_argument("--activated", metavar="DATE", help="default: now (ISO date or time)")
    ca.add_argument("--reference", default="", help="order or invoice number")
    cb = command("balance", cmd_credits_balance, "credit left, per pack", credits)
    cb.add_argument("org", metavar="ORG", help=ORG)
    cb.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    cb.add_argument("--json", action="store_true", help=JSON)
    cst = command("statement", cmd_credits_statement, "the ledger, with a running balance",
                  credits)  # fmt: skip
    cst.add_argument("org", metavar="ORG", help=ORG)
    cst.add_argument(
        "--from",
        dest="start",
        metavar="DATE",
        help="entries from this day (the organisation's time zone)",
    )
    cst.add_argument("--to", dest="end", metavar="DATE", help="...until before this day")
    cst.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    form = cst.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help=JSON + " (times in UTC)")
    form.add_argument("--csv", action="store_true", help="CSV (times in UTC)")
    csp = command("spend", cmd_credits_spend, "record time on a ticket and charge it", credits)
    csp.add_argument("ticket", metavar="TICKET", help="tracking number")
    csp.add_argument("duration", metavar="DURATION", help="45m, 1h30, 1.5h, …")
    csp.add_argument("--by", default="operator", help="who did the work (default: operator)")
    csp.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)
    crv = command("reverse", cmd_credits_reverse,
                  "correct a spend: a reversing entry gives its credits back", credits)  # fmt: skip
    crv.add_argument("entry", type=int, metavar="ENTRY", help="the spend's id in the statement")
    crv.add_argument("--note", default="corrected by an operator", help="why, kept in the ledger")
    csw = command("sweep", cmd_credits_sweep,
                  "book expiries and send expiry notices (the daemon does it hourly)",
                  credits)  # fmt: skip
    csw.add_argument("--now", metavar="ISO", help=ACT_AT)

    quarantine = group("quarantine", "mail held for an operator")
    qsub = quarantine.add_subparsers(metavar="ACTION")
    ql = command("list", cmd_quarantine_list, "held mail, newest first", qsub)
    ql.add_argument("--limit", type=int, default=100, help=LIMIT)
    ql.add_argument("--json", action="store_true", help=JSON)
    qs = command("show", cmd_quarantine_show, "one held mail: why, and its headers", qsub)
    qs.add_argument("id", type=int, metavar="ID", help=HELD)
    qs.add_argument("--raw", action="store_true", help="print the whole raw mail")
    qr = command("release", cmd_quarantine_release,
                 "run held mail through the pipeline again (after a fix)", qsub)  # fmt: skip
    qr.add_argument("ids", nargs="+", type=int, metavar="ID", help=HELD)
    qr.add_argument("--no-send", action="store_true", help="leave queued mail to the daemon")
    qd = command("delete", cmd_quarantine_delete, "drop held mail (the record stays)", qsub)
    qd.add_argument("ids", nargs="+", type=int, metavar="ID", help=HELD)

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
    ge.add_argument(
        "--format",
        choices=("json", "zip"),
        default="json",
        help="zip: export.json and the attachments' files (default: json on stdout)",
    )
    ge.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    gr = command("erase", cmd_gdpr_erase, "remove a person from everything stored", gsub)
    gr.add_argument("email", metavar="EMAIL")
    gr.add_argument("--yes", action="store_true", help="really erase (without: say what it would)")
    gh = command("log-hash", cmd_gdpr_log_hash,
                 "the keyed hash that stands for an address in the logs", gsub)  # fmt: skip
    gh.add_argument("email", metavar="EMAIL")
    return parser
