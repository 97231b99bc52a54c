"""settings.yaml: the one file operators edit, validated with precise errors.

Every problem is reported as one line naming the file, the key and what to do,
never as a traceback. Relative paths are resolved against the settings file's
folder so that `mailgate --config /etc/mailgate/settings.yaml` works from any
working directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mailgate.pipeline.patterns import compile_pattern
from mailgate.sla.calendar import holiday_checker, parse_hours

DEFAULT_CONFIG = "settings.yaml"


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one operator-readable line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def valid_address(value: str) -> str:
    """The address as stored (lower-cased), or ValueError saying what is wrong.

    An internationalised domain in its ASCII form (IDNA A-labels), as intake
    compares senders (pipeline/parse/addresses.normalise_address) and as MTAs
    carry it: kept in Unicode, a contact at bücher.example never matched their
    own mail, rejected as "not in the directory"."""
    try:
        # Deliverability needs DNS; we only check the syntax here.
        result = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid email address ({exc})") from None
    return (result.ascii_email or result.normalized).lower()


Address = Annotated[str, AfterValidator(valid_address)]


def _from_header(value: str) -> str:
    from email.utils import parseaddr

    _, addr = parseaddr(value)
    if not addr or "\n" in value or "\r" in value:
        raise ValueError(
            f"{value!r} is not a valid From header, e.g. 'Support <support@example.com>'"
        )
    valid_address(addr)
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# A staff group, as the directory gives it to staff and rules route to it
# (`then: {group: billing}`); "Billing" is the same group.
GroupName = Annotated[str, BeforeValidator(_lower), Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmtpIntake(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    max_message_bytes: int = Field(26_214_400, gt=0)
    max_recipients: int = Field(50, gt=0)
    max_connections: int = Field(100, gt=0)
    max_connections_per_client: int = Field(10, gt=0)
    timeout_seconds: int = Field(300, gt=0)
    tls_cert_file: Path | None = None  # with tls_key_file: STARTTLS is offered
    tls_key_file: Path | None = None
    tls_port: int | None = Field(None, ge=0, le=65535)  # also listen with implicit TLS here
    auth_users_file: Path | None = None  # `user:password` lines; AUTH only after STARTTLS
    # Budget per connection for commands other than MAIL/RCPT/DATA/RSET (NOOP floods → 421).
    command_call_limit: int = Field(20, gt=0)
    max_messages_per_connection: int = Field(100, gt=0)
    max_parallel_messages: int = Field(4, gt=0)  # pipeline runs at once; others wait
    # Mail held in memory at once, received and being parsed (intake/budget.py).
    memory_budget_mb: int = Field(256, ge=16)
    # Answer 451 when the pipeline takes longer (RFC 5321 clients give up after 10 min).
    reply_timeout_seconds: int = Field(120, gt=0)
    shutdown_grace_seconds: int = Field(20, gt=0)  # in-flight messages may finish on SIGTERM
    # The upstream MTA (an MX in front of us) whose Authentication-Results we believe.
    trusted_authserv_ids: list[str] = []

    @model_validator(mode="after")
    def _tls_for_what_needs_it(self) -> SmtpIntake:
        # Without a certificate neither would ever happen, and nothing would say so.
        if self.tls_cert_file is None or self.tls_key_file is None:
            if self.tls_port is not None:
                raise ValueError("tls_port needs tls_cert_file and tls_key_file (the "
                                 "certificate served there)")  # fmt: skip
            if self.auth_users_file is not None:
                raise ValueError("auth_users_file needs tls_cert_file and tls_key_file: AUTH "
                                 "is offered only over TLS, never a password in clear")  # fmt: skip
        return self


class ImapIntake(Strict):
    enabled: bool = False
    name: str = Field("imap", pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # in logs and stored state
    host: str = "imap.example.com"
    port: int = Field(993, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    tls_ca_file: Path | None = None  # trust this CA (a private one) instead of the system's
    allow_plaintext: bool = False  # tls: none to a host that is not loopback
    username: str = "support@example.com"
    password_file: Path | None = None
    password_env: str | None = None
    # XOAUTH2 (Microsoft 365, Google): a command printing a fresh access token.
    oauth2_token_command: str | None = None
    folder: str = "INBOX"
    processed_folder: str = "mailgate/processed"
    failed_folder: str = "mailgate/failed"
    idle: bool = True
    idle_seconds: int = Field(25 * 60, gt=0, le=29 * 60)  # IDLE is re-issued after this
    poll_seconds: int = Field(60, gt=0)
    max_message_bytes: int = Field(26_214_400, gt=0)  # larger mail goes to failed_folder
    # Per read: a link cut silently during IDLE is noticed at most this long after
    # idle_seconds. A message whose whole fetch takes longer than fetch_timeout_seconds,
    # twice, goes to failed_folder.
    timeout_seconds: int = Field(30, gt=0)
    fetch_timeout_seconds: int = Field(300, gt=0)
    # The provider's Authentication-Results we believe (e.g. mx.google.com).
    trusted_authserv_ids: list[str] = []

    @model_validator(mode="after")
    def _folders_apart(self) -> ImapIntake:
        # A message moved into the folder it was read from gets a new UID there:
        # it would be read, recorded as a duplicate and moved again, for ever.
        for key in ("processed_folder", "failed_folder"):
            if mailbox_name(getattr(self, key)) == mailbox_name(self.folder):
                raise ValueError(
                    f"{key} is the folder mailgate reads ({self.folder}); "
                    "give it a folder of its own, e.g. mailgate/processed"
                )
        return self


def mailbox_name(name: str) -> str:
    """As an IMAP server compares them: INBOX in any case is INBOX (RFC 3501 5.1)."""
    return "INBOX" if name.upper() == "INBOX" else name


# Labels of the two forms of intake.imap: pydantic puts them in an error's
# location, format_validation_errors leaves them out of the key it names.
ONE_MAILBOX, MAILBOXES = "one mailbox", "a list of mailboxes"


class Intake(Strict):
    smtp: SmtpIntake = SmtpIntake()
    # One mailbox, or a list of them (each with its own `name`). Told apart by the
    # shape of the value, so that a problem is reported once, for what was written.
    imap: Annotated[
        Annotated[ImapIntake, Tag(ONE_MAILBOX)] | Annotated[list[ImapIntake], Tag(MAILBOXES)],
        Discriminator(lambda value: MAILBOXES if isinstance(value, list) else ONE_MAILBOX),
    ] = ImapIntake()

    @property
    def mailboxes(self) -> list[ImapIntake]:
        """The enabled IMAP mailboxes."""
        boxes = self.imap if isinstance(self.imap, list) else [self.imap]
        return [box for box in boxes if box.enabled]

    @field_validator("imap")
    @classmethod
    def _names_unique(cls, value: ImapIntake | list[ImapIntake]) -> Any:
        if isinstance(value, list):
            names = [box.name for box in value]
            if len(set(names)) != len(names):
                raise ValueError("each mailbox in the list needs its own name")
        return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OutboundSmtp(Strict):
    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "none"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    timeout_seconds: int = Field(30, gt=0)
    allow_plaintext: bool = False  # AUTH without TLS to a host that is not loopback

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> OutboundSmtp:
        # A relay on the LAN that trusts our address needs no TLS; a password does.
        in_clear = self.tls == "none" and not (self.allow_plaintext or is_loopback(self.host))
        if self.username and in_clear:
            raise ValueError(
                f"username with tls: none would send the password in clear to {self.host};"
                " use tls: starttls or implicit (or allow_plaintext: true to force it)"
            )
        return self


class Outbound(Strict):
    from_: Annotated[str, AfterValidator(_from_header)] = Field(
        "Support <support@example.com>", alias="from"
    )
    transport: Literal["maildir", "smtp"] = "maildir"
    maildir: Path = Path("var/sent")
    smtp: OutboundSmtp = OutboundSmtp()
    # 126 attempts: 2 h of doubling delays, then hourly, until about 5 days
    # have passed (RFC 5321 4.5.4.1; Postfix's maximal_queue_lifetime).
    max_attempts: int = Field(126, gt=0)
    retry_base_seconds: int = Field(60, gt=0)
    retry_max_seconds: int = Field(3600, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def number_format_problem(number_format: str) -> str | None:
    """Why tracking numbers cannot be made from `number_format`, or None.

    Sequences restart at 1 every year, so without {year} next January's numbers
    would collide with this year's; and the `[NUMBER]` subject tag is found by a
    regex of digits, so {seq} must print digits only (`{seq:6d}` pads with spaces).
    """
    example = "e.g. SUP-{year}-{seq:06d}"
    try:
        fields = list(string.Formatter().parse(number_format))
    except ValueError as exc:
        return f"{number_format!r} is not a format ({exc}): {example}"
    names = [name for _, name, _, _ in fields if name is not None]
    for literal, name, spec, conversion in fields:
        if re.search(r"[\[\]\s]", literal):
            return f"{number_format!r}: no brackets or spaces (the number goes in [ ] in subjects)"
        if name is None:
            continue
        if name not in ("year", "seq") or conversion:
            return f"{number_format!r}: only {{year}} and {{seq}} may be used, {example}"
        if not re.fullmatch(r"d?|0[1-9][0-9]?d?", spec or ""):
            return f"{number_format!r}: {{{name}:{spec}}} must print digits only, {example}"
    if sorted(set(names)) != ["seq", "year"] or len(names) != 2:
        return (f"{number_format!r} must contain {{year}} and {{seq}} once each (the sequence"
                f" starts again at 1 every year), {example}")  # fmt: skip
    return None


class Tickets(Strict):
    number_format: str = "SUP-{year}-{seq:06d}"
    secret_file: Path = Path("var/secret.key")
    reject_notice_hours: int = Field(24, ge=0)
    reopen_days: int = Field(14, ge=0)
    default_priority: Literal["P1", "P2", "P3"] = "P3"
    # The priority when no rule sets one, per plan (else default_priority).
    plan_priority: dict[str, Literal["P1", "P2", "P3"]] = {}
    # A customer's X-Priority/Importance: `lower` lets "low" lower an unset
    # priority to P3; "high" never raises it (the rules decide). `ignore`.
    customer_priority_header: Literal["lower", "ignore"] = "lower"
    # Staff replies: what is cut before the relay, and what a reply does to the status.
    trim_quoted: bool = True
    strip_signature: bool = True
    reply_markers: list[str] = []  # extra regexes: a matching line starts the quoted part
    status_after_staff_reply: Literal["open", "waiting_customer"] = "open"
    # A ticket waiting on the customer: reminder after N business days, then
    # resolved automatically after M more (0 turns either off).
    waiting_reminder_days: int = Field(3, ge=0)
    waiting_resolve_days: int = Field(4, ge=0)

    @field_validator("number_format")
    @classmethod
    def _numbers_unique_and_findable(cls, value: str) -> str:
        if problem := number_format_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("reply_markers")
    @classmethod
    def _markers_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            compile_pattern(pattern)  # by the engine that will run it; ValueError names it
        return value


# Possessive \s*+: white space and the other tokens never overlap, and four
# backtracking \s* in a row take minutes to refuse a long run of spaces.
_SPAN = re.compile(
    r"^\s*+(?:(?P<d>[0-9]+)\s*+d)?\s*+(?:(?P<h>[0-9]+)\s*+h)?\s*+(?:(?P<m>[0-9]+)\s*+m)?\s*+$"
)


def _span(value: str) -> str:
    match = _SPAN.match(str(value))
    if not match or not any(match.groupdict().values()):
        raise ValueError(
            f"{value!r} is not a duration; write minutes, hours or business days: "
            "15m, 4h, 1h30m, 2d"
        )
    return str(value)


# An SLA target: "15m", "8h", "1h30m", "2d"; a `d` is one business day of the
# calendar it is measured in (9 h for 09:00-18:00, 24 h for 24/7).
Span = Annotated[str, AfterValidator(_span)]


def span_parts(value: str) -> tuple[int, int]:
    """(business days, minutes) of a validated Span."""
    match = _SPAN.match(value)
    assert match is not None
    days, hours, minutes = (int(match.group(k) or 0) for k in ("d", "h", "m"))
    return days, hours * 60 + minutes


class SlaTarget(Strict):
    """One target: a span ("8h"), or a span in a calendar of its own
    ({within: 15m, calendar: 24/7}: enterprise P1's first response is
    answered around the clock, its resolution still in business hours)."""

    within: Span
    calendar: str | None = None  # else the priority's, else the plan's


def _target(value: Any) -> Any:
    # Checked here, so a bad "8x" is named at the key the operator wrote.
    return {"within": _span(value)} if isinstance(value, str) else value


Target = Annotated[SlaTarget, BeforeValidator(_target)]


class SlaTargets(Strict):
    """Targets of one priority; `workaround` is optional."""

    first_response: Target
    workaround: Target | None = None
    resolution: Target
    calendar: str | None = None  # else the plan's


class SlaPlan(Strict):
    calendar: str = "business"
    P1: SlaTargets
    P2: SlaTargets
    P3: SlaTargets


class SlaTargetsOverride(Strict):
    first_response: Target | None = None
    workaround: Target | None = None
    resolution: Target | None = None
    calendar: str | None = None


class SlaOverride(Strict):
    """Per organisation: any key of a plan, the rest from the organisation's plan."""

    calendar: str | None = None
    P1: SlaTargetsOverride = SlaTargetsOverride()
    P2: SlaTargetsOverride = SlaTargetsOverride()
    P3: SlaTargetsOverride = SlaTargetsOverride()


class SlaCalendar(Strict):
    # "24/7", or weekday keys (mon, mon-fri) to "09:00-18:00" / "09:00-12:00, 13:00-18:00" / closed.
    hours: str | dict[str, str | list[str] | None]
    timezone: str | None = None  # else the organisation's
    holidays: bool = True  # public holidays of `country` (else the organisation's)
    country: str | None = None
    subdivision: str | None = None
    dates: list[date] = []  # closed on these days too

    @field_validator("hours")
    @classmethod
    def _hours_parse(cls, value: Any) -> Any:
        parse_hours(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str | None) -> str | None:
        if value is not None:
            valid_timezone(value)
        return value

    @model_validator(mode="after")
    def _country_known(self) -> SlaCalendar:
        # Without a country of its own, the organisation's is checked by `mailgate check`.
        if self.holidays and self.country is not None:
            holiday_checker(self.country, self.subdivision)
        return self


def valid_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}, e.g. Europe/Brussels") from None
    return value


_BUSINESS_TARGETS = {
    "P1": {"first_response": "1h", "workaround": "2h", "resolution": "8h"},
    "P2": {"first_response": "1h", "workaround": "4h", "resolution": "2d"},
    "P3": {"first_response": "4h", "resolution": "5d"},
}


def _default_plans() -> dict[str, SlaPlan]:
    """DESIGN.md's table: business hours, except enterprise P1 answered within 15 min, 24/7."""
    plain = SlaPlan.model_validate(_BUSINESS_TARGETS)
    enterprise_p1 = {**_BUSINESS_TARGETS["P1"],
                     "first_response": {"within": "15m", "calendar": "24/7"}}  # fmt: skip
    enterprise = SlaPlan.model_validate({**_BUSINESS_TARGETS, "P1": enterprise_p1})
    return {"basic": plain, "pro": plain, "enterprise": enterprise}


def _default_calendars() -> dict[str, SlaCalendar]:
    return {
        "business": SlaCalendar(hours={"mon-fri": "09:00-18:00"}),
        "24/7": SlaCalendar(hours="24/7", holidays=False),
    }


class Sla(Strict):
    enabled: bool = True
    sweep_seconds: int = Field(60, gt=0)  # how often the daemon looks for due reminders
    # Staff are reminded at these fractions of each target; at 1 the target is breached.
    reminders: list[float] = [0.5, 0.8]
    escalation_to: list[Address] = []  # told of every breach, with the assignee or staff
    calendars: dict[str, SlaCalendar] = Field(default_factory=_default_calendars)
    plans: dict[str, SlaPlan] = Field(default_factory=_default_plans)
    default_plan: str = "basic"  # for organisations whose plan has no targets here
    organisations: dict[str, SlaOverride] = {}

    @field_validator("reminders")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value):
            raise ValueError("reminders are fractions of the target between 0 and 1, e.g. 0.5")
        return sorted(set(value))

    @model_validator(mode="after")
    def _names_exist(self) -> Sla:
        problems = []
        if self.default_plan not in self.plans:
            problems.append(f"default_plan {self.default_plan!r} is not one of sla.plans")
        for where, plan in [
            *((f"plans.{n}", p) for n, p in self.plans.items()),
            *((f"organisations.{n}", p) for n, p in self.organisations.items()),
        ]:
            named = [(f"{where}.calendar", plan.calendar)]
            for priority in ("P1", "P2", "P3"):
                part = getattr(plan, priority)
                named.append((f"{where}.{priority}.calendar", part.calendar))
                named.extend(
                    (f"{where}.{priority}.{kind}.calendar", target.calendar)
                    for kind in ("first_response", "workaround", "resolution")
                    if (target := getattr(part, kind)) is not None
                )
            problems.extend(
                f"{key}: no calendar {name!r} in sla.calendars"
                for key, name in named
                if name is not None and name not in self.calendars
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CreditPack(Strict):
    """A pack customers buy: `credits: 20`, or `hours: 10` (4 quarter-hour credits each)."""

    credits: int | None = Field(None, gt=0)
    hours: int | None = Field(None, gt=0)
    validity_months: int = Field(12, gt=0, le=120)  # from activation

    @model_validator(mode="after")
    def _one_size(self) -> CreditPack:
        if (self.credits is None) == (self.hours is None):
            raise ValueError("give either credits or hours")
        return self

    @property
    def size(self) -> int:
        return self.credits if self.credits is not None else 4 * (self.hours or 0)


class CreditOverride(Strict):
    overdraft: bool | None = None
    when_exhausted: Literal["flag", "reject"] | None = None


def _default_packs() -> dict[str, CreditPack]:
    return {
        "light": CreditPack(credits=20),
        "maxi": CreditPack(credits=100),
        "10h": CreditPack(hours=10),
        "20h": CreditPack(hours=20),
        "100h": CreditPack(hours=100),
    }


class Credits(Strict):
    """Prepaid support: one credit per started quarter-hour, urgent work double."""

    enabled: bool = True
    packs: dict[str, CreditPack] = Field(default_factory=_default_packs)
    urgent_multiplier: int = Field(2, ge=1)
    rollover: bool = True  # unused credits move into a pack activated before they expire
    overdraft: bool = False  # may the balance go below zero?
    # An organisation with packs and no credit left: new tickets that are not P1
    # are accepted and flagged, or rejected with an explanation.
    when_exhausted: Literal["flag", "reject"] = "flag"
    low_balance: int = Field(8, ge=0)  # the admins are told once when it drops below
    expiry_notice_days: int = Field(30, ge=0)  # ...and this long before credits expire
    organisations: dict[str, CreditOverride] = {}

    def overdraft_for(self, org_id: str) -> bool:
        found = self.organisations.get(org_id)
        return found.overdraft if found and found.overdraft is not None else self.overdraft

    def when_exhausted_for(self, org_id: str) -> str:
        found = self.organisations.get(org_id)
        if found and found.when_exhausted is not None:
            return found.when_exhausted
        return self.when_exhausted


class RetentionOverride(Strict):
    closed_days: int = Field(gt=0)


class Retention(Strict):
    """How long support data is kept (RELIABILITY §6, mailgate/privacy/)."""

    enabled: bool = True  # the daemon's leader runs it hourly; `mailgate retention run` by hand
    # A closed ticket this many days old loses its raw mail, attachments, HTML and
    # outbound bytes, and its people become per-ticket pseudonyms.
    closed_days: int = Field(365, gt=0)
    # Quarantined mail, and mail rejected from senders outside the directory.
    quarantine_days: int = Field(30, gt=0)
    batch: int = Field(200, gt=0, le=2000)  # tickets per transaction-sized step
    organisations: dict[str, RetentionOverride] = {}

    def closed_days_for(self, org_id: str) -> int:
        found = self.organisations.get(org_id)
        return found.closed_days if found else self.closed_days


class Limits(Strict):
    """Past these, mail is quarantined with the reason instead of parsed (RELIABILITY §5)."""

    max_header_bytes: int = Field(64 * 1024, gt=0)  # the top-level header block
    max_depth: int = Field(50, gt=0, le=200)  # MIME nesting; the stdlib recurses ~970 deep
    max_parts: int = Field(500, gt=0)  # MIME parts, containers included
    max_addresses: int = Field(1000, gt=0)  # in one address header (To, Cc, …)
    max_attachments: int = Field(100, gt=0)
    max_attachment_bytes: int = Field(50 * 1024 * 1024, gt=0)  # all attachments, decoded


class Loops(Strict):
    """The layers behind the header screen: caps that stop what slips through it."""

    # Automatic mail (acks, rejections, notices) to one address, across tickets.
    auto_mail_per_address_per_hour: int = Field(5, gt=0)
    auto_mail_per_address_per_day: int = Field(20, gt=0)
    auto_mail_per_ticket_per_hour: int = Field(10, gt=0)
    # Circuit breaker: past this many new tickets in an hour from one sender (or
    # with one subject, across senders), further new tickets are quarantined.
    # Per sender as many as it may get acks for: no ticket opens unacknowledged
    # because a robot wrote too fast (RELIABILITY.md checklist 5).
    tickets_per_sender_per_hour: int = Field(5, gt=0)
    tickets_per_subject_per_hour: int = Field(10, gt=0)
    alert_to: list[Address] = []  # told once per day when a cap or breaker trips; else staff


def _unquoted_off(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false: what the operator wrote was "off".
    return "off" if value is False else value


Policy = Annotated[Literal["require", "prefer", "off"], BeforeValidator(_unquoted_off)]


class Authentication(Strict):
    """Does the sender's domain vouch for the mail (DKIM aligned with From, or a
    trusted Authentication-Results header)? What to do when it does not."""

    # require: quarantine, and a notice to the real address; prefer: accept and
    # flag the ticket; off: do not look. Staff /commands need authenticated
    # mail unless the staff policy is off.
    policy: Policy = "prefer"
    staff_policy: Policy = "prefer"
    organisations: dict[str, Policy] = {}
    # Our own authserv-id: incoming Authentication-Results claiming it are
    # forgeries and are removed. Default: the support address's domain.
    authserv_id: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]{1,253}$")
    dns_timeout_seconds: float = Field(5, gt=0, le=30)
    notice_hours: int = Field(24, ge=0)  # at most one spoofing notice per address per period


class Hygiene(Strict):
    limits: Limits = Limits()
    loops: Loops = Loops()
    authentication: Authentication = Authentication()


class Metrics(Strict):
    enabled: bool = False  # Prometheus /metrics, served by `mailgate run`
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class Settings(Strict):
    support_address: Address = "support@example.com"
    database_url: str = "sqlite:///var/mailgate.db"
    # Where raw mail and attachments live: `auto` is the database on PostgreSQL
    # (several instances reach it) and files under data_dir on SQLite.
    blob_store: Literal["auto", "directory", "database"] = "auto"
    data_dir: Path = Path("var/")
    directory: Path | None = Path("directory.yaml")
    # A sync that would deactivate more organisations, contacts and staff than
    # this is refused (a truncated export would lock customers out); so is a
    # file that lists nobody. `mailgate directory sync --force` applies it.
    directory_max_deactivations: int = Field(50, ge=0)
    instance_id: str = Field("mailgate", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    intake: Intake = Intake()
    outbound: Outbound = Outbound()
    tickets: Tickets = Tickets()
    metrics: Metrics = Metrics()
    rules_dir: Path = Path("rules/")
    templates_dir: Path = Path("templates/")
    sla: Sla = Sla()
    hygiene: Hygiene = Hygiene()
    credits: Credits = Credits()
    retention: Retention = Retention()
    # Where relative paths were resolved from, and the file read; not keys operators write.
    base_dir: Path = Field(Path("."), exclude=True)
    source: str = Field("settings.yaml", exclude=True)

    @field_validator("database_url")
    @classmethod
    def _database_reachable_by_a_driver(cls, value: str) -> str:
        # Here, not at the first connection: a PostgreSQL URL without its driver
        # installed was a traceback, and `run` exited 1 for systemd to restart.
        from mailgate.store.db import database_url_problem

        if problem := database_url_problem(value):
            raise ValueError(problem)
        return value

    @property
    def support_domain(self) -> str:
        return self.support_address.rsplit("@", 1)[1]

    def path(self, value: Path) -> Path:
        return value if value.is_absolute() else self.base_dir / value


_FIX_HINTS = {
    "extra_forbidden": "remove it or check its spelling",
    "missing": "add it",
}


Location = tuple[int | str, ...]


def format_validation_errors(
    source: str,
    exc: ValidationError,
    locate: Callable[[Location], tuple[str, Location]] | None = None,
) -> list[str]:
    """One line per error: `source: key: problem (hint)`. `locate` may name a
    better place for an error than the file and its key path (a CSV row)."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in (ONE_MAILBOX, MAILBOXES))
        where, loc = locate(loc) if locate else (source, loc)
        key = ".".join(str(p) for p in loc) or "(top level)"
        hint = _FIX_HINTS.get(err["type"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {key}: {message}" + (f" ({hint})" if hint else ""))
    return lines


# libyaml's loader when PyYAML was built with it: the same safe subset, ten times faster.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    """Read a YAML file, turning every failure into a ConfigError line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found (create it or pass --config PATH)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read ({exc})"]) from None
    try:
        return yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}{where}: invalid YAML: {problem}"]) from None
    except ValueError as exc:
        raise ConfigError([f"{path}{unconstructible_value(text, exc)}"]) from None


def unconstructible_value(text: str, exc: ValueError) -> str:
    """`:line: key: problem` for a well-formed YAML value that cannot be built.

    PyYAML reads `2026-02-30` as a date and lets `datetime.date` raise a bare
    ValueError with no position; walking the composed nodes finds the scalar,
    so that the operator is told the line and key instead of shown a traceback.
    """
    try:
        root: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    builder = yaml.SafeLoader("")
    pending: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while pending:
        node, key = pending.pop()
        if isinstance(node, yaml.ScalarNode):
            try:
                builder.construct_object(node)
            except ValueError:
                return (
                    f":{node.start_mark.line + 1}: {key or '(top level)'}: {_bad_scalar(node, exc)}"
                )
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{key}.{i}".lstrip(".")) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            pending.extend((value, f"{key}.{name.value}".lstrip(".")) for name, value in node.value)
    return f": a value cannot be read ({exc})"


def _bad_scalar(node: yaml.ScalarNode, exc: ValueError) -> str:
    if node.tag.endswith(":timestamp"):
        return f"{node.value!r} is not a date ({exc}): write a real one as YYYY-MM-DD"
    return f"{node.value!r} cannot be read ({exc}): quote it if it is text"


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit or os.environ.get("MAILGATE_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate settings; raise ConfigError listing every problem."""
    file = config_path(path)
    data = load_yaml(file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: expected a mapping of keys at the top level"])
    return settings_from_mapping(data, source=str(file), base_dir=file.resolve().parent)


def settings_from_mapping(data: dict[str, Any], *, source: str, base_dir: Path) -> Settings:
    for internal in ("base_dir", "source"):
        if internal in data:
            raise ConfigError(
                [f"{source}: {internal}: unknown key (remove it or check its spelling)"]
            )
    try:
        settings = Settings.model_validate({**data, "base_dir": base_dir, "source": source})
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(source, exc)) from None
    return _resolve_database_url(settings)


def _resolve_database_url(settings: Settings) -> Settings:
    """Make a relative SQLite path relative to the settings file, like other paths."""
    match = re.match(r"^sqlite(\+\w+)?:///(?!/)(.+)$", settings.database_url)
    if not match or match.group(2) == ":memory:":
        return settings
    absolute = settings.base_dir / match.group(2)
    url = f"sqlite{match.group(1) or ''}:///{absolute}"
    return settings.model_copy(update={"database_url": url})


def folder_missing(path: Path) -> str | None:
    """What is wrong with a folder a setting names ("not found", "is not a
    folder"), or None when it is one."""
    if path.is_dir():
        return None
    return "is not a folder" if path.exists() else "not found"


def running_user() -> str:
    """The name of the user this process runs as, for "not writable by USER" lines."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return str(os.geteuid())


def read_secret(*, file: Path | None, env: str | None, settings: Settings, key: str) -> str | None:
    """A secret from `<key>_env` (preferred) or `<key>_file`; ConfigError names the key."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError([f"{key}_env: environment variable {env} is not set"])
        return value
    if file:
        path = settings.path(file)
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{key}_file: cannot read {path} ({exc.strerror})"]) from None
    return None
