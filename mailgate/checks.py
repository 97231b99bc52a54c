"""`mailgate check`: every problem an operator can fix, one line each."""

from __future__ import annotations

from pathlib import Path

from mailgate.config import ConfigError, Settings, load_settings


def run_checks(settings_file: Path) -> list[str]:
    try:
        settings = load_settings(settings_file)
    except ConfigError as exc:
        return exc.problems  # nothing else can be checked without valid settings
    problems: list[str] = []
    for check in (check_directory, check_templates, check_database, check_paths):
        try:
            problems += check(settings)
        except ConfigError as exc:
            problems += exc.problems
    return problems


def check_directory(settings: Settings) -> list[str]:
    from mailgate.directory import load_directory

    if settings.directory is None:
        return []
    load_directory(settings.path(settings.directory))
    return []


def check_templates(settings: Settings) -> list[str]:
    from mailgate.outbound.templates import TemplateSet

    path = settings.path(settings.templates_dir)
    if not path.is_dir():
        return [f"templates_dir: {path} is not a folder"]
    return TemplateSet(path).check()


def check_database(settings: Settings) -> list[str]:
    from sqlalchemy.exc import SQLAlchemyError

    from mailgate.store.db import current_revision, head_revision, make_engine

    try:
        engine = make_engine(settings.database_url)
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0]
        return [f"database_url: cannot connect ({first})"]
    if current is None:
        return []  # an empty database is migrated on first use
    if current != head_revision():
        return [f"database_url: schema at {current}, expected {head_revision()}: "
                "run 'mailgate db upgrade' after a backup"]  # fmt: skip
    return []


def check_paths(settings: Settings) -> list[str]:
    problems = []
    data_dir = settings.path(settings.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".mailgate-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        problems.append(f"data_dir: {data_dir} is not writable ({exc.strerror})")
    return problems
