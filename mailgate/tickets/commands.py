"""The ``/commands`` a staff member writes at the top of a reply.

    /status waiting
    /spend 1h30
    /cc alice@acme.example

    Hello Alice, ...

Only the run of lines at the very top that start with ``/`` is read: once a
line of ordinary text appears, everything after it is body, so a ``/`` later in
the mail (a path, a quoted command) can never change a ticket by accident.

Pure: no I/O, no database. Nothing here raises on bad input; every line we
cannot accept becomes a ``Problem`` whose reason the caller sends back, and the
caller refuses the whole mail if there is any (a half-applied set of commands
would be worse than none).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from mailgate.pipeline.parse import normalise_address

CommandValue = str | int | bool | None
# (canonical name, value) from the command as written and the rest of its line
Handler = Callable[[str, str], tuple[str, CommandValue]]


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line number in the body
    name: str  # status, priority, urgent, assign, level, spend, cc, internal or bug
    value: CommandValue


@dataclass(frozen=True)
class Problem:
    line: int
    text: str  # the line as written, stripped
    reason: str  # an English sentence the staff member can act on


@dataclass(frozen=True)
class StaffMail:
    commands: tuple[Command, ...]
    problems: tuple[Problem, ...]
    body: str  # the text after the command block, leading blank lines removed

    @property
    def internal(self) -> bool:
        return any(command.name == "internal" for command in self.commands)

    @property
    def only_commands(self) -> bool:
        return not self.body.strip()


def read_commands(text: str) -> StaffMail:
    lines = _split_lines(text)
    end = _command_block_end(lines)
    reader = _BlockReader()
    for number, line in enumerate(lines[:end], start=1):
        if line.strip():
            reader.read(number, line.strip())
    return StaffMail(
        commands=tuple(reader.commands),
        problems=tuple(reader.problems),
        body="\n".join(lines[end:]),
    )


def _split_lines(text: str) -> list[str]:
    # Only CR/LF break lines: str.splitlines() would also break on form feeds
    # and U+2028, and then our line numbers would not match the staff's mail.
    text = text.removeprefix("\ufeff")  # a BOM would hide the first "/"
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _command_block_end(lines: list[str]) -> int:
    """Index of the first body line: the first non-blank line not starting with "/".

    Quoted lines ("> /status closed") start with ">", so they end the block too.
    """
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("/"):
            return index
    return len(lines)


# --- one line -----------------------------------------------------------------------


class _Refused(Exception):
    """A command line we cannot accept; the message is the Problem's reason."""


def _interpret(text: str) -> tuple[str, CommandValue]:
    """(name, value) of one stripped command line, or _Refused with the reason."""
    word, rest = _split_command(text)
    handler = _HANDLERS.get(word)
    if handler is None:
        raise _Refused(_unknown_command(word))
    return handler(f"/{word}", rest)


def _split_command(text: str) -> tuple[str, str]:
    """("status", "closed") from "/Status  closed": the word lower-cased, the rest."""
    parts = text[1:].split(None, 1)
    word = parts[0].lower() if parts else ""
    return word, parts[1].strip() if len(parts) > 1 else ""


def _unknown_command(word: str) -> str:
    known = ", ".join(f"/{name}" for name in _HANDLERS)
    if not word:
        return f"a line at the top of the mail that starts with / must be a command; known: {known}"
    guess = difflib.get_close_matches(word, _HANDLERS, n=1)
    hint = f" (did you mean /{guess[0]}?)" if guess else ""
    return f"unknown command /{_shorten(word)}{hint}; known: {known}"


def _shorten(text: str, limit: int = 40) -> str:
    # A reason quotes what was written; a pasted paragraph should not flood it.
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _expect_nothing(command: str, rest: str) -> None:
    if rest:
        raise _Refused(f"{command} takes no value; remove {_shorten(rest)!r}")


def _expect_one(command: str, rest: str, allowed: str) -> str:
    if not rest:
        raise _Refused(f"{command} needs a value: {allowed}")
    word, *extra = rest.split()
    if extra:
        raise _Refused(f"{command} takes a single value; remove {_shorten(' '.join(extra))!r}")
    return word


def _not_allowed(command: str, word: str, allowed: str) -> _Refused:
    return _Refused(f"{command} does not accept {_shorten(word)!r}; use {allowed}")


# --- the commands -------------------------------------------------------------------


def _flag(name: str, value: CommandValue) -> Handler:
    """A command without argument that always means the same thing (/close, /bug)."""

    def read(command: str, rest: str) -> tuple[str, CommandValue]:
        _expect_nothing(command, rest)
        return name, value

    return read


def _choice(name: str, choices: Mapping[str, str], allowed: str) -> Handler:
    """A command taking one keyword, matched without regard to case."""

    def read(command: str, rest: str) -> tuple[str, CommandValue]:
        word = _expect_one(command, rest, allowed)
        value = choices.get(word.lower())
        if value is None:
            raise _not_allowed(command, word, allowed)
        return name, value

    return read


_STATUS = {
    "open": "open",
    "waiting": "waiting_customer",
    "waiting_customer": "waiting_customer",
    "pending": "waiting_customer",
    "resolved": "resolved",
    "closed": "closed",
}
_PRIORITY = {f"{prefix}{n}": f"P{n}" for prefix in ("p", "") for n in (1, 2, 3)}
_LEVEL = {f"{prefix}{n}": f"L{n}" for prefix in ("l", "") for n in (1, 2, 3)}
# "on/yes/true" are accepted too, so that writing the obvious opposite of
# "/urgent off" does not earn a refusal.
_URGENT = {"off": False, "no": False, "false": False, "on": True, "yes": True, "true": True}
_URGENT_ALLOWED = "nothing to mark the ticket urgent, or off (no, false) to clear it"


def _urgent(command: str, rest: str) -> tuple[str, CommandValue]:
    if not rest:
        return "urgent", True
    word = _expect_one(command, rest, _URGENT_ALLOWED)
    value = _URGENT.get(word.lower())
    if value is None:
        raise _not_allowed(command, word, _URGENT_ALLOWED)
    return "urgent", value


# RFC 5322 specials, barred from an unquoted local part. normalise_address
# checks the domain but lets the local part through, so "a@x.example,b@y.example"
# (two addresses pasted on one line) would otherwise become one odd address.
_LOCAL_SPECIALS = frozenset('()<>[]:;@\\,"')


def _address(command: str, word: str) -> str:
    inner = word[1:-1] if word.startswith("<") and word.endswith(">") else word
    address = normalise_address(inner)
    local = address.rpartition("@")[0] if address else ""
    if address is None or (not local.startswith('"') and _LOCAL_SPECIALS & set(local)):
        raise _Refused(f"{command} needs an email address; {_shorten(word)!r} is not one")
    return address


def _assign(command: str, rest: str) -> tuple[str, CommandValue]:
    word = _expect_one(command, rest, "me or an email address")
    if word.lower() == "me":
        return "assign", "me"
    return "assign", _address(command, word)


def _cc(command: str, rest: str) -> tuple[str, CommandValue]:
    return "cc", _address(command, _expect_one(command, rest, "an email address"))


def _spend(command: str, rest: str) -> tuple[str, CommandValue]:
    # The whole rest of the line: "1h 30m" is one duration with a space in it.
    if not rest:
        raise _Refused(f"{command} needs a duration: {DURATION_FORMS}")
    try:
        return "spend", parse_duration(rest)
    except ValueError as exc:
        raise _Refused(f"{command}: {exc}") from None


_HANDLERS: dict[str, Handler] = {
    "status": _choice("status", _STATUS, "open, waiting, resolved or closed"),
    "close": _flag("status", "closed"),
    "reopen": _flag("status", "open"),
    "resolve": _flag("status", "resolved"),
    "priority": _choice("priority", _PRIORITY, "P1, P2 or P3"),
    "urgent": _urgent,
    "assign": _assign,
    "level": _choice("level", _LEVEL, "L1, L2 or L3"),
    "spend": _spend,
    "cc": _cc,
    "internal": _flag("internal", True),
    "bug": _flag("bug", True),
    # A workaround was given: stops the workaround SLA clock.
    "workaround": _flag("workaround", True),
}


# --- the block as a whole ---------------------------------------------------------------

# Settings a ticket has only one of: two different values in one mail are a
# contradiction we refuse rather than silently let the later line win.
_ONE_PER_MAIL = frozenset({"status", "priority", "urgent", "assign", "level"})


@dataclass
class _BlockReader:
    commands: list[Command] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    _first: dict[str, tuple[Command, str]] = field(default_factory=dict)
    _seen: set[tuple[str, CommandValue]] = field(default_factory=set)

    def read(self, number: int, text: str) -> None:
        try:
            name, value = _interpret(text)
        except _Refused as refusal:
            self.problems.append(Problem(number, text, str(refusal)))
            return
        self._accept(Command(number, name, value), text)

    def _accept(self, command: Command, text: str) -> None:
        if command.name in _ONE_PER_MAIL:
            self._accept_setting(command, text)
        elif command.name == "spend":
            # Each /spend is its own time entry (a call and a fix may both be
            # 30m), so equal values are not merged.
            self.commands.append(command)
        elif (command.name, command.value) not in self._seen:
            self._seen.add((command.name, command.value))
            self.commands.append(command)

    def _accept_setting(self, command: Command, text: str) -> None:
        earlier = self._first.get(command.name)
        if earlier is None:
            self._first[command.name] = (command, text)
            self.commands.append(command)
            return
        first, first_text = earlier
        if first.value == command.value:
            return  # the same value twice says nothing new
        written = f"/{_split_command(text)[0]}"
        reason = (
            f"{written} conflicts with line {first.line} ({_shorten(first_text)}); "
            "keep only one of them"
        )
        self.problems.append(Problem(command.line, text, reason))


# --- durations ---------------------------------------------------------------------------

MAX_SPEND_MINUTES = 24 * 60
DURATION_FORMS = "minutes (45, 45m, 45min) or hours (1h, 1h30, 1h30m, 1h 30m, 1:30, 1.5h, 1,5h)"

_HOURS = r"(?:h|hrs?|hours?)"
_MINUTES = r"(?:m|mins?|minutes?)"
# Input is lower-cased first, so no IGNORECASE: with it, "ſ" would match "s".
_PLAIN_MINUTES = re.compile(rf"(?P<m>[0-9]+)\s*{_MINUTES}?")
_HOURS_MINUTES = re.compile(rf"(?P<h>[0-9]+)\s*{_HOURS}(?:\s*(?P<m>[0-9]+)\s*{_MINUTES}?)?")
_CLOCK = re.compile(r"(?P<h>[0-9]+):(?P<m>[0-9]{2})")
_DECIMAL_HOURS = re.compile(rf"(?P<h>[0-9]*[.,][0-9]+)\s*{_HOURS}")
# Longer than any sensible duration; also keeps int() away from huge digit runs.
_MAX_DURATION_CHARS = 32


def parse_duration(value: str) -> int:
    """Minutes in one ``/spend`` entry; ValueError with a sentence for the staff member."""
    text = value.strip().lower()
    if len(text) > _MAX_DURATION_CHARS:
        raise ValueError(f"{_shorten(value.strip())!r} is too long for a duration")
    minutes = _minutes(text)
    if minutes is None:
        raise ValueError(f"{_shorten(value.strip())!r} is not a duration; write {DURATION_FORMS}")
    if minutes < 1:
        raise ValueError(f"{value.strip()!r} is less than a minute; one entry is at least 1 minute")
    if minutes > MAX_SPEND_MINUTES:
        raise ValueError(f"{value.strip()!r} is more than 24 hours; one entry is at most 24h")
    return minutes


def _minutes(text: str) -> int | None:
    """The minutes ``text`` (lower-cased) says, unchecked for range; None if no form fits."""
    if match := _PLAIN_MINUTES.fullmatch(text):
        return int(match["m"])
    if match := _HOURS_MINUTES.fullmatch(text) or _CLOCK.fullmatch(text):
        return _hours_and_minutes(text, int(match["h"]), int(match["m"] or 0))
    if match := _DECIMAL_HOURS.fullmatch(text):
        hours = Decimal(match["h"].replace(",", "."))
        # Fractions like 0.33h are not whole minutes; round to the nearest one.
        return int((hours * 60).to_integral_value(rounding=ROUND_HALF_UP))
    return None


def _hours_and_minutes(text: str, hours: int, minutes: int) -> int:
    # "1h75" is more likely a typo than 2h15; refuse rather than guess.
    if minutes >= 60:
        raise ValueError(f"in {text!r} the minutes after the hours must be under 60")
    return hours * 60 + minutes
