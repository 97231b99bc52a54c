"""Personal data: `retention`, `gdpr`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mailgate.cli.common import EX_OK, EX_PROBLEM, CommandError, acting_at, load_app, parse_now


def cmd_retention_run(args: argparse.Namespace) -> int:
    from mailgate.privacy.retention import run

    app = load_app(args, sync_directory=False)
    # A dry run changes nothing: it may look at any time.
    now = (parse_now(args.now) or app.clock()) if args.dry_run else acting_at(args.now, app)
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
