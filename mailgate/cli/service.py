"""Running the service: the daemon, `check`, the schema, the directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from mailgate.cli.common import EX_OK, EX_PROBLEM, CommandError, load_app
from mailgate.config import config_path, load_settings


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
