"""directory.yaml / .csv: who may write to support, synced into the database.

Sync is an idempotent upsert. People and organisations missing from the file
become inactive, never deleted: their tickets and history stay intact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.config import (
    Address,
    ConfigError,
    GroupName,
    Location,
    format_validation_errors,
    load_yaml,
    valid_timezone,
)
from mailgate.store.db import DIRECTORY_LOCK_KEY, transaction_lock
from mailgate.store.models import Contact, Organisation, Staff
from mailgate.store.state import get_state, set_state

if TYPE_CHECKING:
    from mailgate.app import App

log = logging.getLogger("mailgate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContactEntry(_Strict):
    email: Address
    name: str = ""
    role: Literal["admin", "member"] = "member"
    active: bool = True


class OrganisationEntry(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    name: str
    plan: Literal["basic", "pro", "enterprise"] = "basic"
    contract_from: date | None = None
    contract_until: date | None = None
    language: Literal["fr", "en", "es"] = "en"
    timezone: Annotated[str, AfterValidator(valid_timezone)] = "UTC"
    country: str | None = Field(None, pattern=r"^[A-Z]{2}$")
    referents: list[Address] = []  # contacts told about support credit (default: the admins)
    contacts: list[ContactEntry] = []

    @model_validator(mode="after")
    def _referents_are_contacts(self) -> OrganisationEntry:
        unknown = set(self.referents) - {c.email for c in self.contacts}
        if unknown:
            raise ValueError(f"referents {sorted(unknown)} are not contacts of {self.id}: "
                             "list them under contacts too")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _contract_ends_after_it_starts(self) -> OrganisationEntry:
        # Never active, so every admin's mail would be refused: a typo, not a contract.
        start, end = self.contract_from, self.contract_until
        if start is not None and end is not None and end < start:
            raise ValueError(f"contract_until {end} is before contract_from {start}")
        return self


class StaffEntry(_Strict):
    email: Address
    name: str = ""
    level: Literal["L1", "L2", "L3"] = "L1"
    active: bool = True
    groups: list[GroupName] = []


class DirectoryFile(_Strict):
    organisations: list[OrganisationEntry] = []
    staff: list[StaffEntry] = []


@dataclass(frozen=True)
class SyncReport:
    organisations: int
    contacts: int
    staff: int
    deactivated: int
    # Organisations whose plan, time zone or country changed: their tickets' SLA
    # deadlines must be computed again.
    replanned: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"{self.organisations} organisations, {self.contacts} contacts, {self.staff} staff "
            f"synced; {self.deactivated} deactivated"
        )


def refuse_mass_deactivation(path: Path, report: SyncReport, limit: int) -> None:
    """ConfigError (the caller's transaction rolls back) when a sync looks like a
    broken export rather than a change: it lists nobody, or it would deactivate
    more than `limit` organisations, contacts and staff at once."""
    listed = report.organisations + report.contacts + report.staff
    if report.deactivated == 0 or (listed and report.deactivated <= limit):
        return
    if not listed:
        why = f"lists no organisation and no staff, so it would deactivate all {report.deactivated}"
    else:
        why = (f"would deactivate {report.deactivated} organisations, contacts and staff "
               f"(more than directory_max_deactivations: {limit})")  # fmt: skip
    raise ConfigError([
        f"{path}: {why}; nothing was changed. A truncated export? If the file is right, "
        f"run: mailgate directory sync --force {path}"
    ])  # fmt: skip


def load_directory(path: Path) -> DirectoryFile:
    if path.suffix.lower() == ".csv":
        return _load_csv(path)
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected 'organisations:' and 'staff:' at the top level"])
    try:
        directory = DirectoryFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(str(path), exc)) from None
    _check_unique_addresses(path, directory)
    return directory


def _check_unique_addresses(path: Path, directory: DirectoryFile) -> None:
    seen: dict[str, str] = {}
    problems = []
    people = [
        (c.email, f"organisation {o.id}") for o in directory.organisations for c in o.contacts
    ]
    people += [(s.email, "staff") for s in directory.staff]
    for email, where in people:
        if email in seen:
            problems.append(
                f"{path}: {email}: listed twice ({seen[email]} and {where}); keep one entry"
            )
        seen[email] = where
    if problems:
        raise ConfigError(problems)


# A contact row's columns about its organisation (a later row's value wins).
ORGANISATION_COLUMNS = (
    "organisation_name",
    "plan",
    "contract_from",
    "contract_until",
    "language",
    "timezone",
    "country",
)


CSV_COLUMNS = (
    "kind",
    "email",
    "name",
    "role",
    "level",
    "organisation",
    *ORGANISATION_COLUMNS,
    "referent",  # contact rows: yes, no (the default)
    "groups",  # staff rows: group names, separated by spaces or commas
)


# A CSV's place for a value: its line, by the value's key path in the mapping.
CsvLines = dict[Location, int]
# What a row's own error (no column) is about, by the list the row went to.
_ROW_KIND: dict[int | str, str] = {
    "organisations": "organisation",
    "contacts": "contact",
    "staff": "staff",
}


def _load_csv(path: Path) -> DirectoryFile:
    """A spreadsheet's export: every bad row named by its line, all at once."""
    data, lines, problems = _csv_to_mapping(path)

    def locate(loc: Location) -> tuple[str, Location]:
        for end in range(len(loc), 0, -1):  # the most precise place known
            if (line := lines.get(loc[:end])) is not None:
                here = loc[end - 1]  # a column (str), or a row (its index in its list)
                key = loc[end:] or (
                    (here,) if isinstance(here, str) else (_ROW_KIND[loc[end - 2]],)
                )
                return f"{path}:{line}", key
        return str(path), loc

    try:
        directory = DirectoryFile.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_errors(str(path), exc, locate)
    if problems:
        raise ConfigError(sorted(problems, key=lambda problem: _line_of(path, problem)))
    _check_unique_addresses(path, directory)
    return directory


def _line_of(path: Path, problem: str) -> int:
    """The line a problem names (`FILE:LINE: …`), 0 for the file as a whole."""
    line = problem.removeprefix(f"{path}:").split(":", 1)[0]
    return int(line) if line.isdecimal() else 0


def _csv_to_mapping(path: Path) -> tuple[dict[str, list[dict[str, object]]], CsvLines, list[str]]:
    """One row per person: kind=contact rows carry their organisation's columns.
    Gives the mapping DirectoryFile validates, each value's line, and the rows
    that could not be read (left out of the mapping)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:  # a spreadsheet's export in its local code page
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start}); save it as CSV UTF-8"]) from None
    reader = csv.DictReader(io.StringIO(text))
    unknown = set(reader.fieldnames or ()) - set(CSV_COLUMNS)
    if unknown:
        raise ConfigError([f"{path}: unknown columns {sorted(unknown)}; allowed: {CSV_COLUMNS}"])
    orgs: dict[str, dict[str, object]] = {}
    staff: list[dict[str, object]] = []
    lines: CsvLines = {}
    places: dict[str, Location] = {}  # organisation id: its place in the mapping
    problems: list[str] = []
    for line, row in enumerate(reader, start=2):
        row = {k: v.strip() for k, v in row.items() if v and v.strip()}
        kind = row.pop("kind", "contact")
        if kind == "staff":
            member: dict[str, object] = {k: row[k] for k in ("email", "name", "level") if k in row}
            if "groups" in row:
                member["groups"] = row["groups"].replace(",", " ").split()
            lines[("staff", len(staff))] = line
            staff.append(member)
        elif kind == "contact":
            org_id = row.get("organisation")
            referent = _yes(row.get("referent", ""))
            if not org_id:
                problems.append(f"{path}:{line}: organisation: missing for a contact row")
                continue
            if referent is None:
                problems.append(f"{path}:{line}: referent: {row['referent']!r} is not yes or no")
                continue
            if org_id not in orgs:
                where = ("organisations", len(orgs))  # its place in the mapping
                orgs[org_id] = {"id": org_id, "name": org_id, "contacts": []}
                places[org_id], lines[where] = where, line
            org, where = orgs[org_id], places[org_id]
            for column in ORGANISATION_COLUMNS:
                if column in row:  # a later row's value wins: its line is the one to name
                    key = "name" if column == "organisation_name" else column
                    org[key], lines[(*where, key)] = row[column], line
            contacts: list[dict[str, object]] = org["contacts"]  # type: ignore[assignment]
            lines[(*where, "contacts", len(contacts))] = line
            contacts.append({k: row[k] for k in ("email", "name", "role") if k in row})
            if referent:
                org.setdefault("referents", []).append(row.get("email"))  # type: ignore[union-attr]
        else:
            problems.append(f"{path}:{line}: kind: {kind!r} is not 'contact' or 'staff'")
    return {"organisations": list(orgs.values()), "staff": staff}, lines, problems


def _yes(value: str) -> bool | None:
    """A referent cell: yes or no (empty is no); None when it is neither."""
    word = value.lower()
    if word not in ("", "yes", "no", "true", "false", "1", "0"):
        return None
    return word in ("yes", "true", "1")


def sync_directory(session: Session, directory: DirectoryFile) -> SyncReport:
    """Upsert everything in the file; deactivate what the file no longer lists."""
    orgs = {o.id: o for o in session.scalars(select(Organisation))}
    contacts = {c.email: c for c in session.scalars(select(Contact))}
    staff = {s.email: s for s in session.scalars(select(Staff))}
    listed_orgs: set[str] = set()
    listed_contacts: set[str] = set()
    listed_staff: set[str] = set()
    replanned: list[str] = []

    for entry in directory.organisations:
        org = orgs.get(entry.id) or Organisation(id=entry.id)
        if entry.id in orgs and (org.plan, org.timezone, org.country) != (
            entry.plan,
            entry.timezone,
            entry.country,
        ):
            replanned.append(entry.id)
        org.name, org.plan = entry.name, entry.plan
        org.contract_from, org.contract_until = entry.contract_from, entry.contract_until
        org.language, org.timezone, org.country = entry.language, entry.timezone, entry.country
        org.active = True
        session.add(org)
        listed_orgs.add(entry.id)
        for c in entry.contacts:
            contact = contacts.get(c.email) or Contact(email=c.email)
            contact.name, contact.role, contact.active = c.name, c.role, c.active
            contact.referent = c.email in entry.referents
            contact.organisation = org
            session.add(contact)
            contacts[c.email] = contact
            listed_contacts.add(c.email)

    for s in directory.staff:
        member = staff.get(s.email) or Staff(email=s.email)
        member.name, member.level, member.active = s.name, s.level, s.active
        member.groups = list(s.groups)
        session.add(member)
        listed_staff.add(s.email)

    deactivated = 0
    for rows, listed in ((orgs, listed_orgs), (contacts, listed_contacts), (staff, listed_staff)):
        for key, row in rows.items():
            if key not in listed and row.active:
                row.active = False
                deactivated += 1
    for email, contact in contacts.items():  # listed with `active: false` too
        contact.listed = email in listed_contacts
    session.flush()
    return SyncReport(
        len(listed_orgs), len(listed_contacts), len(listed_staff), deactivated, tuple(replanned)
    )


# Changed whenever the same directory file is stored differently, so that the
# first start of the new version syncs it again: "2", addresses at
# internationalised domains in IDNA (A-labels), as intake compares senders;
# "3", contacts the file lists as inactive told apart from those gone from it.
DIRECTORY_READING = b"3\n"


def sync_directory_if_changed(app: App) -> str | None:
    """Sync the settings' directory file when its content changed since the last sync
    (on every start and reload of the daemon, and before most commands)."""
    from mailgate.sla.clocks import retarget

    if app.settings.directory is None:
        return None
    path = app.settings.path(app.settings.directory)
    if not path.exists():
        raise ConfigError([f"{app.settings.source}: directory: {path} not found"])
    digest = hashlib.sha256(DIRECTORY_READING + path.read_bytes()).hexdigest()
    with app.sessions.begin() as session:
        # One sync at a time on PostgreSQL: instances syncing a changed directory at
        # once (every machine reloaded after configuration management pushed it, or
        # their first start) all read the old checksum, inserted the same new
        # contacts, and all but one failed on a duplicate key. Waiting here, the
        # others find the checksum up to date.
        transaction_lock(session, DIRECTORY_LOCK_KEY)
        if get_state(session, "directory.sha256") == digest:
            return None
        report = sync_directory(session, load_directory(path))
        refuse_mass_deactivation(path, report, app.settings.directory_max_deactivations)
        retarget(app.sla, session, report.replanned, app.clock())
        set_state(session, "directory.sha256", digest)
    log.info("directory %s: %s", path, report)
    return str(report)
