"""Shared by the commands: loading the app, printing, reading times, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from mailgate.app import App
from mailgate.config import load_settings
from mailgate.directory import sync_directory_if_changed
from mailgate.observability import set_log_key

EX_OK, EX_PROBLEM, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78

log = logging.getLogger("mailgate")


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit 1 (78 from `run`)."""


def load_app(args: argparse.Namespace, *, sync_directory: bool = True) -> App:
    settings = load_settings(args.config)
    app = App(settings, clock=args.clock)
    set_log_key(app.log_key)
    app.rules  # noqa: B018 - a broken rule file stops here, listed, before any mail is touched
    if sync_directory:
        sync_directory_if_changed(app)
    return app


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, default=str))


def human(value: object, sep: str = ", ") -> str:
    """A value as text for people: `-` for nothing, yes/no, a list joined (not Python's repr)."""
    if isinstance(value, list | tuple):
        return sep.join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


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


def acting_at(value: str | None, app: App) -> datetime:
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


def send_queued(app: App) -> None:
    try:
        app.send_outbox()
    except Exception as exc:  # noqa: BLE001 - mail stays queued for the daemon
        log.warning("queued mail not sent now (the daemon will retry): %s", exc)


def sweep_once(args: argparse.Namespace, sweep: Callable[[App, datetime], object]) -> int:
    """One run of a scheduled sweep, for cron or a test clock; then send what it queued."""
    app = load_app(args, sync_directory=False)
    print(sweep(app, acting_at(args.now, app)))
    send_queued(app)
    return EX_OK
