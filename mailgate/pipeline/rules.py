"""Priority rules: operator-written YAML, read once, evaluated as a pure function.

`rules/*.yaml` files are read in file-name order, the rules of a file in
their order. The first matching rule that sets a value decides it; later
matching rules only fill values still unset; `stop: true` ends the
evaluation. So the files go from the most to the least specific (the shipped
ones: 10-urgent, 20-critical, 30-major, 40-minor).

    rules:
      - name: service down
        when:
          any:
            - text: ["service down", "panne", "caído"]     # keywords, subject or body
            - subject_regex: "\\bp(anne|1)\\b"
        then: {priority: P1}

Conditions (one mapping: all of its keys must hold; `all:`/`any:` lists
combine mappings and nest): `subject`, `body`, `text` (keyword lists, whole
words, case and accents folded), `subject_regex`, `body_regex`,
`text_regex`, `organisation`, `plan`, `role`, `language` (lists),
`has_attachment` (bool), `header` ({name: regex}), `time` ({from: "18:00",
to: "08:00", weekdays: [sat, sun]} in the organisation's time zone).
Values (`then`): `priority`, `urgent`, `level`, `assignee`, `group`, `tags`,
`stop`.

A broken file is reported as `file:line: problem`, and the whole rule set is
refused: `check` and `rules test` print it, a reload keeps the old rules.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, time
from pathlib import Path
from typing import Any, Literal

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mailgate.config import ConfigError, GroupName, folder_missing, unconstructible_value
from mailgate.pipeline.patterns import compile_pattern, found

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_TEXT = 100_000  # characters of a body the rules look at


class RulesError(ConfigError):
    """A broken rule file: one `file:line: problem` per entry of `problems`."""


# --- what one mail looks like to the rules --------------------------------------------------


@dataclass(frozen=True)
class Facts:
    subject: str
    body: str
    organisation: str | None = None
    plan: str | None = None
    role: str | None = None
    language: str | None = None
    has_attachment: bool = False
    headers: Mapping[str, Sequence[str]] = field(default_factory=dict)  # lower-cased names
    local_time: datetime | None = None  # in the organisation's time zone

    @functools.cached_property
    def folded_subject(self) -> str:
        return fold(self.subject)

    @functools.cached_property
    def folded_body(self) -> str:
        return fold(self.body[:MAX_TEXT])


_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def fold(text: str) -> str:
    """Lower case without accents: "Panne GÉNÉRALE" and "panne generale" read the same."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return plain.translate(_QUOTES)  # "can’t" as typed on a phone is "can't"


# --- the file format ----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeWindow(_Strict):
    from_: time = Field(alias="from")
    to: time
    weekdays: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = list(WEEKDAYS)  # type: ignore[assignment]

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _clock_time(cls, value: object) -> object:
        # Unquoted 18:00 is the number 1080 to YAML (base 60): refuse it, not misread it.
        if not isinstance(value, str) or not re.fullmatch(r"\d{1,2}:\d{2}", value.strip()):
            raise ValueError('write the time quoted, as "HH:MM" (e.g. "18:00")')
        return value.strip()

    def contains(self, moment: datetime) -> bool:
        if WEEKDAYS[moment.weekday()] not in self.weekdays:
            return False
        now = moment.time()
        if self.from_ <= self.to:
            return self.from_ <= now < self.to
        return now >= self.from_ or now < self.to  # over midnight


class Condition(_Strict):
    all: list[Condition] | None = None
    any: list[Condition] | None = None
    subject: list[str] | None = None
    body: list[str] | None = None
    text: list[str] | None = None
    subject_regex: str | None = None
    body_regex: str | None = None
    text_regex: str | None = None
    organisation: list[str] | None = None
    plan: list[str] | None = None
    role: list[Literal["admin", "member"]] | None = None
    language: list[str] | None = None
    has_attachment: bool | None = None
    header: dict[str, str] | None = None
    time: TimeWindow | None = None

    @field_validator("subject_regex", "body_regex", "text_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            compile_pattern(value)
        return value

    @field_validator("header")
    @classmethod
    def _header_regexes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for pattern in (value or {}).values():
            compile_pattern(pattern)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        # `subject:` with nothing after it, `header: {}` or `any: []` would test
        # nothing, and a rule testing nothing matches every mail.
        empty = [n for n in self.model_fields_set if getattr(self, n) in (None, [], {})]
        if empty:
            raise ValueError(f"{', '.join(sorted(empty))}: empty; write what it should test")
        if not self.model_fields_set:
            raise ValueError("an empty condition matches everything; write what it should test")
        return self

    def matches(self, facts: Facts) -> bool:
        if self.all is not None and not all(c.matches(facts) for c in self.all):
            return False
        if self.any is not None and not any(c.matches(facts) for c in self.any):
            return False
        for name, where in (("subject", "s"), ("body", "b"), ("text", "sb")):
            words = getattr(self, name)
            if words is not None and not _search(_keywords(tuple(words)), facts, where):
                return False
            pattern = getattr(self, f"{name}_regex")
            if pattern is not None and not _search(compile_pattern(pattern), facts, where):
                return False
        for name in ("organisation", "plan", "role", "language"):
            allowed = getattr(self, name)
            if allowed is not None and getattr(facts, name) not in allowed:
                return False
        if self.has_attachment is not None and facts.has_attachment != self.has_attachment:
            return False
        for header, pattern in (self.header or {}).items():
            values = facts.headers.get(header.lower(), ())
            if not any(found(compile_pattern(pattern), v) for v in values):
                return False
        return self.time is None or (
            facts.local_time is not None and self.time.contains(facts.local_time)
        )


class Then(_Strict):
    priority: Literal["P1", "P2", "P3"] | None = None
    urgent: bool | None = None
    level: Literal["L1", "L2", "L3"] | None = None
    assignee: str | None = None
    group: GroupName | None = None  # of the staff
    tags: list[str] = []
    stop: bool = False


class Rule(_Strict):
    name: str = Field(min_length=1)
    when: Condition
    then: Then
    source: str = ""  # file:line, filled by the loader


class _RuleFile(_Strict):
    rules: list[Rule]


@functools.lru_cache(maxsize=1024)
def _keywords(words: tuple[str, ...]) -> regex.Pattern[str]:
    """Whole words or phrases: "down" must not match "download"."""
    # A phrase matches across any run of white space: bodies are hard-wrapped.
    alternatives = "|".join(
        r"\s+".join(regex.escape(part) for part in fold(w).split()) for w in words if w.strip()
    )
    return regex.compile(rf"(?<!\w)(?:{alternatives})(?!\w)" if alternatives else "(?!)")


def _search(pattern: regex.Pattern[str], facts: Facts, where: str) -> bool:
    if "s" in where and found(pattern, facts.folded_subject):
        return True
    return "b" in where and found(pattern, facts.folded_body)


# --- loading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()


def load_rules(directory: Path, *, setting: str = "rules_dir") -> RuleSet:
    """Every `*.yaml` and `*.yml` in `directory`, by file name; RulesError lists all problems.

    An empty folder is no rules. A missing one is an error (`setting` names the
    settings file and key): a typo or a folder left out of a copy would otherwise
    silently give every ticket the default priority.
    """
    if problem := folder_missing(directory):
        raise RulesError([f"{setting}: {directory} {problem} (create the folder with the "
                          "rule files; an empty folder means no rules)"])  # fmt: skip
    rules: list[Rule] = []
    problems: list[str] = []
    files = sorted(
        [*directory.glob("*.yaml"), *directory.glob("*.yml")], key=lambda path: path.name
    )
    for path in files:
        try:
            rules += _load_file(path)
        except RulesError as exc:
            problems += exc.problems
    names: dict[str, str] = {}
    for rule in rules:
        if rule.name in names:
            problems.append(f"{rule.source}: rule name {rule.name!r} already used at "
                            f"{names[rule.name]}; names must be unique")  # fmt: skip
        names.setdefault(rule.name, rule.source)
    if problems:
        raise RulesError(problems)
    return RuleSet(tuple(rules), tuple(p.name for p in files))


def _load_file(path: Path) -> list[Rule]:
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError([f"{path}: cannot read: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RulesError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except ValueError as exc:  # a well-formed value that cannot be built: `2026-02-30`
        raise RulesError([f"{path}{unconstructible_value(text, exc)}"]) from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise RulesError([f"{path}:1: the file must be a mapping with a `rules:` list"])
    try:
        parsed = _RuleFile.model_validate(data)
    except ValidationError as exc:
        raise RulesError([_problem(path, node, error) for error in exc.errors()]) from None
    return [
        rule.model_copy(update={"source": f"{path}:{_line(node, ('rules', i))}"})
        for i, rule in enumerate(parsed.rules)
    ]


def _problem(path: Path, node: yaml.Node | None, error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc) or "(top)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (see the list of conditions and values in the rules docs)"
    return f"{path}:{_line(node, loc)}: {key}: {message}"


def _line(node: yaml.Node | None, loc: Sequence[str | int]) -> int:
    """The line of the deepest YAML node along `loc` (1-based)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


# --- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    matched: tuple[str, ...]  # rule names, in order
    values: Mapping[str, Any]  # priority, urgent, level, assignee, group: first setter wins
    tags: tuple[str, ...]
    set_by: Mapping[str, str]  # value -> the rule that set it


def evaluate(rules: RuleSet, facts: Facts) -> Evaluation:
    matched: list[str] = []
    values: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    tags: list[str] = []
    for rule in rules.rules:
        if not rule.when.matches(facts):
            continue
        matched.append(rule.name)
        for name in ("priority", "urgent", "level", "assignee", "group"):
            value = getattr(rule.then, name)
            if value is not None and name not in values:
                values[name], set_by[name] = value, rule.name
        tags += [t for t in rule.then.tags if t not in tags]
        if rule.then.stop:
            break
    return Evaluation(tuple(matched), values, tuple(tags), set_by)


# --- the ticket's values: rules, then plan defaults, then the customer's header ------------


@dataclass(frozen=True)
class Classification:
    priority: str
    urgent: bool
    level: str
    assignee: str | None
    group: str | None
    tags: tuple[str, ...]
    matched: tuple[str, ...]
    why: str  # for the ingest record and the ticket history; "" for the plain default

    def as_dict(self) -> dict[str, Any]:
        """What `explain` and `ingest --json` show of the decision."""
        values = asdict(self)
        del values["why"]  # already in the reason
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def classify(
    evaluation: Evaluation,
    *,
    default_priority: str,
    customer_importance: str | None,
    header_policy: str,
) -> Classification:
    """Rules decide; a plan default fills in; a customer's "low" may lower what no rule set.

    A customer's "high" never raises the priority by itself: every mail
    client has the button, and the rules already read what the mail says.
    """
    values = evaluation.values
    priority = values.get("priority")
    why = [f"priority {priority} by rule {evaluation.set_by['priority']!r}"] if priority else []
    if priority is None:
        priority = default_priority
        if customer_importance == "low" and header_policy == "lower":
            priority = "P3"
            why.append("priority P3: the customer marked the mail low importance")
    tags = list(evaluation.tags)
    if customer_importance == "high":
        tags.append("customer-high-importance")
    return Classification(
        priority=priority,
        urgent=bool(values.get("urgent", False)),
        level=values.get("level") or "L1",
        assignee=values.get("assignee"),
        group=values.get("group"),
        tags=tuple(dict.fromkeys(tags)),
        matched=evaluation.matched,
        why="; ".join(why),
    )


_X_PRIORITY = re.compile(r"\s*([1-5])")


def customer_importance(headers: Mapping[str, Sequence[str]]) -> str | None:
    """ "high", "low" or None from X-Priority, Importance or Priority (RFC 2156)."""
    for value in headers.get("x-priority", ()):
        if match := _X_PRIORITY.match(value):
            return {"1": "high", "2": "high", "4": "low", "5": "low"}.get(match.group(1))
    for name in ("importance", "priority"):
        for value in headers.get(name, ()):
            word = value.strip().lower()
            if word in ("high", "urgent"):
                return "high"
            if word in ("low", "non-urgent"):
                return "low"
    return None
