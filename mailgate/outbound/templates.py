"""Outbound mail templates: one (subject, text, html) triple per kind and language.

Layout: ``<templates_dir>/<language>/<kind>.subject.j2``, ``<kind>.txt.j2`` and
``<kind>.html.j2``; files starting with ``_`` are partials (``_labels.j2``)
imported by the others. English is the fallback: a kind is rendered in the
requested language only when all three of its files exist there, so one mail
never mixes two languages.

Templates are operator-editable files, so they run in Jinja's sandbox and
fail loudly (``StrictUndefined``) instead of sending a mail with blanks;
``TemplateSet.check`` renders them all with sample data for ``mailgate check``.

A ``TemplateSet`` reads every template file once, when it is built (at start
and at each reload, where ``check`` vets that copy), and renders from that copy
only: a file edited, broken or removed afterwards changes nothing until the
next reload, which checks it first and keeps the old set when it is broken.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import BaseLoader, Environment, StrictUndefined, TemplateNotFound, TemplateSyntaxError
from jinja2.loaders import split_template_path
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup, escape

FALLBACK_LANGUAGE = "en"
PARTS = ("subject", "txt", "html")

# The kinds the daemon sends, and the variables it passes to each: the
# contract between the pipeline and the template files. `check()` renders each
# kind with exactly these variables, so a template that uses one the daemon
# does not pass for that kind is reported before it fails on a real mail.
CONTEXT_KEYS: Mapping[str, frozenset[str]] = {
    # targets: list of dicts: kind ("first_response" | "workaround" | "resolution"),
    # due (a string already in the customer's language and time zone); empty when
    # the SLA is off.
    # credit (ack and resolved): None when the organisation is not on prepaid credit
    # or credits are disabled (nothing is said about credit), else a dict: balance
    # (int, credits left; <= 0 when used up, < 0 an overdraft), expires (when the
    # oldest remaining credits expire, a string already in the customer's language;
    # None when nothing is left to expire), flagged (bool: the organisation had no
    # credit left when the ticket was opened; the ack says it was accepted anyway).
    "ack": frozenset(
        {"ticket", "requester_name", "targets", "credit", "support_address", "language"}
    ),
    "rejection": frozenset({"requester_name", "reason", "support_address", "language"}),
    "staff_new_ticket": frozenset(
        {"ticket", "requester_name", "text", "attachments", "support_address", "language"}
    ),
    "staff_customer_reply": frozenset(
        {"ticket", "requester_name", "text", "support_address", "language"}
    ),
    "staff_reply": frozenset(
        {"ticket", "requester_name", "staff_name", "text", "support_address", "language"}
    ),
    # failed_mail: id (outbox row), kind, to (addresses not reached), subject,
    # message_id, attempts, reason (the relay's words, untrusted text).
    "staff_delivery_failed": frozenset({"ticket", "failed_mail", "support_address", "language"}),
    # reopen_days: a reply within that many days reopens the ticket (0: never);
    # auto_resolved: resolved because the customer did not answer our question.
    "resolved": frozenset(
        {
            "ticket",
            "requester_name",
            "reopen_days",
            "auto_resolved",
            "credit",
            "support_address",
            "language",
        }
    ),
    # resolve_after_days: business days until it is resolved automatically (0: never).
    "waiting_reminder": frozenset(
        {"ticket", "requester_name", "resolve_after_days", "support_address", "language"}
    ),
    # problems: list of dicts: line (1-based), text (the line as written, untrusted
    # text), reason (an English sentence). The whole mail was refused.
    "staff_command_refused": frozenset({"ticket", "problems", "support_address", "language"}),
    # SLA notices: ticket.level is the level after the escalation, for a breach;
    # clock: dict: kind ("first_response" | "workaround" | "resolution"),
    # percent (int: share of the target used, for a reminder), due (a string
    # already formatted, with its time zone), target_minutes (int: the target's
    # length in business minutes).
    "sla_reminder": frozenset({"ticket", "clock", "support_address", "language"}),
    "sla_breach": frozenset({"ticket", "clock", "support_address", "language"}),
    # person_name: the directory's name for the address that was forged.
    "spoof_notice": frozenset({"person_name", "support_address", "language"}),
    # alert: dict: about (an address, "ticket …" or "subject '…'"), reason (English).
    "operator_alert": frozenset({"alert", "support_address", "language"}),
    # Prepaid credit notices to an organisation's admins, no ticket. person_name: the
    # admin's name ("" when unknown); org_name: the organisation's name (may be "").
    # credit_low, once when the balance drops below the low-balance level: balance
    # (int, may be <= 0), threshold (int: that level), expires (as in `credit` above:
    # a formatted date or None).
    "credit_low": frozenset(
        {
            "person_name",
            "org_name",
            "balance",
            "threshold",
            "expires",
            "support_address",
            "language",
        }
    ),
    # credit_expiry, some days before credits expire unused: credits (int: how many
    # will expire), expires (str: the date, formatted), rollover (bool: a pack bought
    # before that date carries them over).
    "credit_expiry": frozenset(
        {"person_name", "org_name", "credits", "expires", "rollover", "support_address", "language"}
    ),
}
KINDS = tuple(CONTEXT_KEYS)
ALL_KEYS = frozenset().union(*CONTEXT_KEYS.values())

# Reason codes the rejection templates translate; any other value gets a
# generic sentence, so an internal detail can never leak into the mail.
REJECTION_REASONS = ("unknown_sender", "not_admin", "no_contract", "no_credit", "too_large")

_LANGUAGE = re.compile(r"[a-z]{2,8}(?:-[a-z0-9]{1,8})*")
_KIND = re.compile(r"[a-z][a-z0-9_]*")
_FILE = re.compile(r"(?P<kind>[a-z][a-z0-9_]*)\.(?P<part>subject|txt|html)\.j2")


@dataclass(frozen=True)
class Rendered:
    subject: str  # one line, whitespace collapsed
    text: str
    html: str


class TemplateRenderError(Exception):
    """A template failed to render; the message names the file (and line when known)."""


def excerpt(value: object, max_lines: int = 20, max_chars: int = 2000) -> str:
    """The first lines of a text, marked when cut: staff notices show a preview only."""
    lines = str(value).strip("\n").splitlines()
    full = "\n".join(lines)
    cut = "\n".join(lines[:max_lines])[:max_chars].rstrip()
    return cut if cut == full else cut + "\n[…]"


def nl2br(value: object) -> Markup:
    """Plain text as HTML lines; escaping happens here because the result is marked safe."""
    return Markup("<br>\n").join(escape(line) for line in str(value).splitlines())


def oneline(value: object) -> str:
    """A value on one line, runs of whitespace (CR/LF included) as one space."""
    return " ".join(str(value).split())


class _Unreadable(Exception):
    """A template file that could not be read when the set was built; rendering
    it fails with the reading error, as reading it then would have."""


class _SnapshotLoader(BaseLoader):
    """Template sources from a dict read once, by name (`fr/ack.txt.j2`).

    Jinja's FileSystemLoader reads a file at first use and again whenever it
    changes on disk: an edit would then reach live mail without a reload, and
    without the check a reload makes first.
    """

    def __init__(self, root: Path, sources: Mapping[str, str | _Unreadable]) -> None:
        self.root = root
        self.sources = sources

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Any]:
        # As FileSystemLoader: `./en//x.j2` is `en/x.j2`, and `..` is refused.
        name = "/".join(split_template_path(template))
        source = self.sources.get(name)
        if source is None:
            raise TemplateNotFound(template)
        if isinstance(source, _Unreadable):
            raise _Unreadable(*source.args)  # a fresh one: a raised one carries a traceback
        # The file's path, for error messages and tracebacks; never stale (uptodate).
        return source, str(self.root / name), lambda: True

    def list_templates(self) -> list[str]:
        return sorted(self.sources)


def _read_sources(root: Path) -> tuple[tuple[str, ...], dict[str, str | _Unreadable]]:
    """The language folders under `root`, and every `*.j2` file directly in `root`
    or in one of its folders (the layout above), read now, by template name."""
    languages: list[str] = []
    sources: dict[str, str | _Unreadable] = {}
    if not root.is_dir():
        return (), sources
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        if _LANGUAGE.fullmatch(folder.name):
            languages.append(folder.name)
    for file in sorted([*root.glob("*.j2"), *(f for d in folders for f in d.glob("*.j2"))]):
        if not file.is_file():
            continue
        name = file.relative_to(root).as_posix()
        try:
            sources[name] = file.read_bytes().decode("utf-8")
        except (OSError, UnicodeError) as exc:
            sources[name] = _Unreadable(str(exc))
    return tuple(languages), sources


def _environment(loader: BaseLoader, *, html: bool) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        loader=loader,
        undefined=StrictUndefined,
        autoescape=html,
        # Text templates are written one statement per line; these keep
        # `{% if %}` lines from leaving blank lines in the mail.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,  # the sources never change (_SnapshotLoader)
    )
    env.filters["excerpt"] = excerpt
    env.filters["nl2br"] = nl2br
    env.filters["oneline"] = oneline
    return env


def _normalise_lines(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n") + "\n"


_SAMPLE_TEXT = "Bonjour,\nl'export échoue : <script>alert(1)</script>\r\n" + "\n".join(
    f"ligne {n} — ü ñ ç" for n in range(25)
)

# A refused /commands block: the first is the degenerate one (sparse), the
# others quote what the staff member wrote, markup and all.
_SAMPLE_PROBLEMS = (
    {"line": 1, "text": "/", "reason": "a line at the top that starts with / must be a command"},
    {
        "line": 1,
        "text": "/statut résolu <script>alert(1)</script>",
        "reason": "unknown command /statut; did you mean /status?",
    },
    {
        "line": 3,
        "text": "/cc <b>josé.müller@example.com</b> & carol",
        "reason": "/cc needs one email address, not '<b>josé.müller@example.com</b> & …'",
    },
    {"line": 4, "text": "/spend " + "9" * 300, "reason": "/spend: not a duration"},
)

# SLA deadlines as the ack shows them: the last two are a due string with
# markup and a line break, and a kind the templates do not know yet.
_SAMPLE_TARGETS = (
    {"kind": "first_response", "due": "lundi 24 novembre à 11:00"},
    {"kind": "workaround", "due": "mardi 25 novembre à 09:30"},
    {"kind": "resolution", "due": "<b>vendredi</b> 28 novembre à 17:00\r\n"},
    {"kind": "new_target", "due": "lundi 1 décembre à 08:00"},
)

# Prepaid credit: an expiry date as the daemon formats it, with markup and a line break.
_SAMPLE_EXPIRES = "<b>23 novembre</b>\r\n2027"


def _sample_credit(kind: str, sparse: bool) -> dict[str, Any] | None:
    """The ack's and resolved notice's `credit`; sparse: used up (ack) or none at all."""
    if not sparse:
        return {"balance": 1234567, "expires": _SAMPLE_EXPIRES, "flagged": False}
    if kind == "resolved":
        return None
    return {"balance": -5, "expires": None, "flagged": True}


def sample_context(kind: str, *, sparse: bool = False) -> dict[str, Any]:
    """Data shaped like the daemon's, hostile on purpose (non-ASCII, markup, CR/LF).

    `sparse` gives the degenerate values the daemon may also pass: no names,
    an empty subject and text, day counts of 0 (a setting turned off), one
    bare refused command, no SLA targets (SLA off), an SLA clock of an unknown
    kind with a 0-minute target, prepaid credit used up or overdrawn with no
    expiry date (the ack's ticket flagged; no credit at all for `resolved`),
    0 credits about to expire without rollover. The full values have markup and
    a line break in the expiry date and seven-digit credit counts.
    """
    full: dict[str, Any] = {
        "ticket": {
            "number": "SUP-2026-000042",
            "subject": "" if sparse else "Échec de l'export <script>alert(1)</script> – ñandú",
            "priority": "P2",
            "status": "open",
            "org_name": "Société Générale d'Équipement & Cie",
            "level": "L3" if sparse else "L2",
        },
        "requester_name": None if sparse else "José Müller-Łukasz",
        "staff_name": "Zoé Dupré" if not sparse else "Bob",
        "text": "" if sparse else _SAMPLE_TEXT,
        "attachments": [] if sparse else [{"name": "rapport <b>final</b>.pdf", "size": 123456}],
        "reason": "something_internal" if sparse else "not_admin",
        "failed_mail": {
            "id": 7,
            "kind": "new_kind" if sparse else "ack",
            "to": [] if sparse else ["josé.müller@example.com", "carol@example.com"],
            "subject": "" if sparse else "Re: Échec <script>alert(1)</script>",
            "message_id": "<mg.42.x7@example.com>",
            "attempts": 1,
            "reason": "" if sparse else "RCPT TO: 550 5.1.1 <x@example.com>: No such user\r\n",
        },
        "reopen_days": 0 if sparse else 14,
        "auto_resolved": not sparse,
        "resolve_after_days": 0 if sparse else 4,
        "problems": [dict(p) for p in (_SAMPLE_PROBLEMS[:1] if sparse else _SAMPLE_PROBLEMS[1:])],
        "targets": [] if sparse else [dict(t) for t in _SAMPLE_TARGETS],
        "clock": {
            "kind": "new_clock" if sparse else "workaround",
            "percent": 100 if sparse else 80,
            "due": "<b>mardi</b>\r\n24 novembre"
            if sparse
            else "Tuesday 24 November at 11:00 (Europe/Brussels) <script>alert(1)</script>",
            "target_minutes": 0 if sparse else 150,
        },
        "person_name": "" if sparse else "José <b>Müller</b>",
        "alert": {
            "about": "subject 'Re: boucle\r\nBcc: x@evil.example <script>'"
            if sparse
            else "alice@acme.example",
            "reason": "loop cap: 5 automatic mails to alice@acme.example in the last hour",
        },
        "credit": _sample_credit(kind, sparse),
        "org_name": "" if sparse else "Société Générale d'Équipement & Cie <b>SA</b>",
        "balance": -5 if sparse else 1234567,
        "threshold": 0 if sparse else 2000000,
        # A date, or None (nothing left to expire) except for credit_expiry.
        "expires": _SAMPLE_EXPIRES
        if not sparse
        else ("1 janvier 2030" if kind == "credit_expiry" else None),
        "credits": 0 if sparse else 1234567,
        "rollover": not sparse,
        "support_address": "support@example.com",
        "language": "en",
    }
    keys = CONTEXT_KEYS.get(kind, ALL_KEYS)
    return {key: value for key, value in full.items() if key in keys}


class TemplateSet:
    """The templates of one directory as read when built, rendered in a sandbox.

    Everything below uses that copy, never the disk: a running daemon keeps
    sending what was checked when it started or last reloaded (module docstring).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.found = self.path.is_dir()
        self._languages, self._sources = _read_sources(self.path)
        loader = _SnapshotLoader(self.path, self._sources)
        self._text_env = _environment(loader, html=False)
        self._html_env = _environment(loader, html=True)

    def languages(self) -> list[str]:
        return list(self._languages)

    def kinds(self) -> list[str]:
        """Kinds that can be rendered in every language: complete in the fallback language."""
        return sorted(k for k in self._kinds_in(FALLBACK_LANGUAGE)
                      if self._complete(FALLBACK_LANGUAGE, k))  # fmt: skip

    def resolve_language(self, kind: str, language: str | None) -> str:
        """The language a kind is rendered in: `fr-BE` → `fr-be`, else `fr`, else English."""
        tag = (language or "").strip().lower().replace("_", "-")
        if _LANGUAGE.fullmatch(tag):  # also keeps `../` out of template names
            for candidate in (tag, tag.split("-", 1)[0]):
                if self._complete(candidate, kind):
                    return candidate
        return FALLBACK_LANGUAGE

    def render(self, kind: str, language: str | None, context: Mapping[str, Any]) -> Rendered:
        """Render one mail. `language` in the context is set to the language actually used.

        Raises ValueError for an unknown kind name or missing context keys (a
        wiring bug), LookupError when the kind has no English templates, and
        TemplateRenderError when a template fails.
        """
        if not _KIND.fullmatch(kind):
            raise ValueError(f"invalid template kind {kind!r}")
        missing = CONTEXT_KEYS.get(kind, frozenset()) - set(context) - {"language"}
        if missing:
            raise ValueError(f"context for {kind!r} lacks {', '.join(sorted(missing))}")
        lang = self.resolve_language(kind, language)
        if not self._complete(lang, kind):
            raise LookupError(f"{self.path / lang}: no complete {kind} templates")
        values = {**context, "language": lang}
        subject = self._render_part(lang, kind, "subject", values)
        return Rendered(
            subject=" ".join(subject.split()),
            text=_normalise_lines(self._render_part(lang, kind, "txt", values)),
            html=_normalise_lines(self._render_part(lang, kind, "html", values)),
        )

    def check(self) -> list[str]:
        """Render every template with sample data; one line per problem, naming the file."""
        if not self.found:
            return [f"{self.path}: templates directory not found"]
        languages = self.languages()
        if FALLBACK_LANGUAGE not in languages:
            return [f"{self.path / FALLBACK_LANGUAGE}: missing; English templates are the "
                    "fallback for every language"]  # fmt: skip
        problems = self._misnamed_files(languages)
        for lang in languages:
            expected = set(self._kinds_in(lang))
            if lang == FALLBACK_LANGUAGE:
                expected |= set(KINDS)
            for kind in sorted(expected):
                problems += self._check_kind(lang, kind)
        # A broken partial is reported by every template importing it: once is enough.
        return list(dict.fromkeys(problems))

    # -- internals -------------------------------------------------------

    def _file(self, lang: str, kind: str, part: str) -> Path:
        return self.path / lang / f"{kind}.{part}.j2"

    def _has(self, lang: str, kind: str, part: str) -> bool:
        return f"{lang}/{kind}.{part}.j2" in self._sources

    def _complete(self, lang: str, kind: str) -> bool:
        return all(self._has(lang, kind, part) for part in PARTS)

    def _files_in(self, lang: str) -> list[str]:
        """File names in a language folder, as read when the set was built."""
        return [name[len(lang) + 1 :] for name in self._sources if name.startswith(f"{lang}/")]

    def _kinds_in(self, lang: str) -> set[str]:
        return {m["kind"] for name in self._files_in(lang) if (m := _FILE.fullmatch(name))}

    def _misnamed_files(self, languages: list[str]) -> list[str]:
        problems = []
        for lang in languages:
            for name in sorted(self._files_in(lang)):
                if not name.startswith("_") and not _FILE.fullmatch(name):
                    problems.append(f"{self.path / lang / name}: not named <kind>.subject.j2, "
                                    "<kind>.txt.j2 or <kind>.html.j2 (partials start with _); "
                                    "ignored")  # fmt: skip
        return problems

    def _render_part(self, lang: str, kind: str, part: str, values: Mapping[str, Any]) -> str:
        env = self._html_env if part == "html" else self._text_env
        try:
            return env.get_template(f"{lang}/{kind}.{part}.j2").render(values)
        except Exception as exc:  # an edited template can fail in any way; name the file
            where = self._location(exc) or self._file(lang, kind, part)
            raise TemplateRenderError(f"{where}: {exc or type(exc).__name__}") from exc

    def _location(self, exc: Exception) -> str | None:
        """`file:line` of the template that failed, which may be an imported partial."""
        if isinstance(exc, TemplateSyntaxError) and exc.filename:
            return f"{exc.filename}:{exc.lineno}"
        # Jinja rewrites tracebacks so that frames point at template lines.
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename.endswith(".j2"):
                return f"{frame.filename}:{frame.lineno}"
        return None

    def _check_kind(self, lang: str, kind: str) -> list[str]:
        missing = [
            self._file(lang, kind, part) for part in PARTS if not self._has(lang, kind, part)
        ]
        if missing and lang == FALLBACK_LANGUAGE:
            return [f"{f}: missing; English is the fallback and must be complete" for f in missing]
        if missing:
            return [f"{f}: missing; the other {kind} templates in {lang} are ignored and "
                    "English is sent instead" for f in missing]  # fmt: skip
        problems: list[str] = []
        for sparse in (False, True):
            context = sample_context(kind, sparse=sparse)
            values = {**context, "language": lang}
            outputs: dict[str, str] = {}
            for part in PARTS:  # each part on its own, so every broken file is named
                try:
                    outputs[part] = self._render_part(lang, kind, part, values)
                except TemplateRenderError as exc:
                    problems.append(str(exc))
            subject = " ".join(outputs.get("subject", "-").split())
            subject_file = self._file(lang, kind, "subject")
            if not subject:
                problems.append(f"{subject_file}: renders an empty subject")
            number = context.get("ticket", {}).get("number")
            if "subject" in outputs and number and number not in subject:
                problems.append(f"{subject_file}: does not contain the ticket number; "
                                "replies would not thread")  # fmt: skip
            if problems:
                break
        return problems
