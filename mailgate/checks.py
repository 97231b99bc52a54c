"""`mailgate check`: every problem an operator can fix, one line each."""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from pathlib import Path

from mailgate.config import ConfigError, Settings, load_settings, read_secret


def run_checks(settings_file: Path) -> list[str]:
    try:
        settings = load_settings(settings_file)
    except ConfigError as exc:
        return exc.problems  # nothing else can be checked without valid settings
    problems: list[str] = []
    checks = (check_directory, check_calendars, check_rules, check_templates, check_database,
              check_paths, check_relay, check_imap)  # fmt: skip
    for check in checks:
        try:
            problems += check(settings)
        except ConfigError as exc:
            problems += exc.problems
    with contextlib.suppress(ConfigError):  # a broken directory is reported above
        problems += check_organisation_keys(settings, settings_file)
    return problems


def check_directory(settings: Settings) -> list[str]:
    from mailgate.directory import load_directory

    if settings.directory is None:
        return []
    load_directory(settings.path(settings.directory))
    return []


def check_calendars(settings: Settings) -> list[str]:
    """Every organisation's country must have public holidays where a calendar uses them."""
    from mailgate.directory import load_directory
    from mailgate.sla.calendar import holiday_checker

    if settings.directory is None:
        return []
    path = settings.path(settings.directory)
    problems = []
    for org in load_directory(path).organisations:
        for name, calendar in settings.sla.calendars.items():
            if not calendar.holidays or calendar.country is not None:
                continue
            try:
                holiday_checker(org.country, calendar.subdivision)
            except ValueError as exc:
                problems.append(
                    f"{path}: organisation {org.id}: country: {exc} (calendar {name} counts "
                    "its public holidays; fix the country or set holidays: false)"
                )
    return problems


def check_organisation_keys(settings: Settings, settings_file: Path) -> list[str]:
    """Per-organisation settings must name organisations of the directory: a typo
    would silently leave that organisation on the default policy or targets."""
    from mailgate.directory import load_directory

    if settings.directory is None:
        return []
    known = {org.id for org in load_directory(settings.path(settings.directory)).organisations}
    keyed = {
        "hygiene.authentication.organisations": settings.hygiene.authentication.organisations,
        "sla.organisations": settings.sla.organisations,
        "credits.organisations": settings.credits.organisations,
        "retention.organisations": settings.retention.organisations,
    }
    return [
        f"{settings_file}: {key}: {org_id}: no such organisation in {settings.directory} "
        "(check the id)"
        for key, mapping in keyed.items()
        for org_id in mapping
        if org_id not in known
    ]


def check_rules(settings: Settings) -> list[str]:
    """Rules must load, and route to people of the directory: an assignee who is
    active staff, a group with an active member (else everyone hears of the ticket)."""
    from mailgate.directory import load_directory
    from mailgate.pipeline.rules import RulesError, load_rules

    try:
        rules = load_rules(settings.path(settings.rules_dir))
    except RulesError as exc:
        return exc.problems
    if settings.directory is None:
        return []
    directory = settings.path(settings.directory)
    try:
        staff = [s for s in load_directory(directory).staff if s.active]
    except ConfigError:
        return []  # check_directory names what is wrong with it
    emails, groups = {s.email for s in staff}, {g for s in staff for g in s.groups}
    problems = []
    for rule in rules.rules:
        if rule.then.assignee is not None and rule.then.assignee.lower() not in emails:
            problems.append(f"{rule.source}: assignee {rule.then.assignee!r} is not active "
                            f"staff in {directory}")  # fmt: skip
        group = rule.then.group
        if group is not None and group not in groups:
            problems.append(f"{rule.source}: group {group!r} has no active member in "
                            f"{directory} (give some staff groups: [{group}])")  # fmt: skip
    return problems


def templates_dir_problem(settings: Settings) -> str | None:
    """The line for a `templates_dir` that is not a folder (`check` and `ingest`), or None."""
    path = settings.path(settings.templates_dir)
    if path.is_dir():
        return None
    what = "is not a folder" if path.exists() else "not found"
    return f"{settings.source}: templates_dir: {path} {what}"


def check_templates(settings: Settings) -> list[str]:
    from mailgate.outbound.templates import TemplateSet

    problem = templates_dir_problem(settings)
    if problem:
        return [problem]
    return TemplateSet(settings.path(settings.templates_dir)).check()


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


# `check` must answer quickly even when the relay host drops packets.
RELAY_CHECK_TIMEOUT = 10.0


def check_relay(settings: Settings) -> list[str]:
    """Open a session with the relay as the sender would: EHLO, STARTTLS, AUTH; send nothing."""
    out = settings.outbound
    if out.transport != "smtp":
        return []
    relay = out.smtp
    password = read_secret(file=relay.password_file, env=relay.password_env,
                           settings=settings, key="outbound.smtp.password")  # fmt: skip
    where = f"{relay.host}:{relay.port}"
    try:
        _relay_session(relay.host, relay.port, relay.tls, relay.username, password,
                       min(float(relay.timeout_seconds), RELAY_CHECK_TIMEOUT))  # fmt: skip
    except smtplib.SMTPResponseException as exc:
        reply = " ".join(exc.smtp_error.decode("utf-8", "replace").split())
        return [f"outbound.smtp: relay {where} refused the session: {exc.smtp_code} {reply}"]
    except (smtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
        hint = " (check host, port and tls)" if relay.tls != "none" else " (check host and port)"
        return [f"outbound.smtp: cannot talk to relay {where}: {exc or type(exc).__name__}"
                + hint]  # fmt: skip
    return []


def _relay_session(host: str, port: int, tls: str, username: str | None,
                   password: str | None, timeout: float) -> None:  # fmt: skip
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if tls == "implicit":
        smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    try:
        smtp.ehlo_or_helo_if_needed()  # the transport falls back to HELO too
        if tls == "starttls":
            smtp.starttls(context=context)  # raises when the relay does not offer it
            smtp.ehlo()
        if username:
            smtp.login(username, password or "")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()  # the relay answered all we asked; a rude goodbye is no problem
    finally:
        smtp.close()


def check_imap(settings: Settings) -> list[str]:
    """Log in to every enabled mailbox, as the daemon will."""
    from imapclient.exceptions import IMAPClientError, LoginError

    from mailgate.app import App
    from mailgate.intake.imap import Mailbox

    app = App(settings, migrate=False)
    problems = []
    for box in settings.intake.mailboxes:
        where = f"intake.imap {box.name}: {box.username} at {box.host}:{box.port}"
        try:
            Mailbox(lambda: app, box).connect().logout()
        except LoginError as exc:
            problems.append(f"{where}: login refused ({exc}); check the password or token")
        except (OSError, IMAPClientError) as exc:
            problems.append(f"{where}: cannot connect ({exc})")
        except ConfigError as exc:
            problems += exc.problems
    return problems
