"""The SMTP listener's files: its certificate and key, and its AUTH users.

Read the same way by `mailgate check`, at start and at reload, so that a file
missing, unreadable or broken is one line naming its key, never a traceback.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mailgate.config import ConfigError, Settings, running_user
from mailgate.config import SmtpIntake as SmtpSettings


def _readable(path: Path, where: str, fix: str) -> str | None:
    """None when the file can be read by this process (opened, not only stat'ed), else the line."""
    try:
        with path.open("rb") as file:
            file.read(1)
    except FileNotFoundError:
        return f"{where}: {path} not found ({fix})"
    except IsADirectoryError:
        return f"{where}: {path} is a folder, not a file ({fix})"
    except OSError as exc:
        return (f"{where}: cannot read {path} ({exc.strerror}; it must be readable by user "
                f"{running_user()}, who runs mailgate)")  # fmt: skip
    return None


def tls_context(settings: SmtpSettings, base_dir: Path, source: str) -> ssl.SSLContext | None:
    """The listener's certificate and key, or None without them; ConfigError naming the key."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError([f"{source}: intake.smtp: set both tls_cert_file and tls_key_file "
                           "(or neither, for no STARTTLS)"])  # fmt: skip
    cert, key = base_dir / cert, base_dir / key
    fix = "give the PEM file's path, or remove tls_cert_file and tls_key_file for no STARTTLS"
    problems = [
        problem
        for name, path in (("tls_cert_file", cert), ("tls_key_file", key))
        if (problem := _readable(path, f"{source}: intake.smtp.{name}", fix)) is not None
    ]
    if problems:
        raise ConfigError(problems)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # An encrypted key fails here instead of OpenSSL asking for its passphrase on a terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError([_tls_problem(source, cert, key, exc)]) from None
    return context


def _tls_problem(source: str, cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """Which of the two files OpenSSL refused (its own message says "PEM lib")."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)  # certificates only
    except ssl.SSLError:
        return (f"{source}: intake.smtp.tls_cert_file: {cert} holds no PEM certificate "
                "(give the certificate chain, -----BEGIN CERTIFICATE-----)")  # fmt: skip
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (f"{source}: intake.smtp.tls_key_file: {key} is not the private key of the "
                f"certificate in {cert} (give the key the certificate was made for)")  # fmt: skip
    return (f"{source}: intake.smtp.tls_key_file: {key} is not an unencrypted PEM private "
            "key (mailgate asks no passphrase: decrypt it with openssl pkey)")  # fmt: skip


def load_users(path: Path | None, base_dir: Path, source: str) -> dict[str, str]:
    """`user:password` lines (blank lines and # comments ignored); ConfigError naming
    the file and key. A line is never quoted back: it holds a password."""
    if path is None:
        return {}
    path = base_dir / path
    where = f"{source}: intake.smtp.auth_users_file"
    fix = "create it with one user:password line per client, or remove the key for no AUTH"
    if (problem := _readable(path, where, fix)) is not None:
        raise ConfigError([problem])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problem = f"{where}: {path} is not UTF-8 (byte {exc.start}); save it as UTF-8"
        raise ConfigError([problem]) from None
    except OSError as exc:  # removed or changed since it was opened above
        raise ConfigError([f"{where}: cannot read {path} ({exc.strerror})"]) from None
    users: dict[str, str] = {}
    first: dict[str, int] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            problems.append(f"{where}: {path}:{number}: not a user:password line with a user "
                            "and a password (# starts a comment)")  # fmt: skip
        elif user in first:
            problems.append(f"{where}: {path}:{number}: user {user!r} is already on line "
                            f"{first[user]}; keep one")  # fmt: skip
        else:
            users[user], first[user] = password, number
    if problems:
        raise ConfigError(problems)
    return users


def file_problems(settings: Settings) -> list[str]:
    """What would stop the SMTP listener from starting: its certificate and key and
    its AUTH users file, one line each (for `mailgate check`, start and reload)."""
    smtp = settings.intake.smtp
    if not smtp.enabled:
        return []
    problems = []
    try:
        tls_context(smtp, settings.base_dir, settings.source)
    except ConfigError as exc:
        problems += exc.problems
    try:
        load_users(smtp.auth_users_file, settings.base_dir, settings.source)
    except ConfigError as exc:
        problems += exc.problems
    return problems
