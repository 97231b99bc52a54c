"""read_commands / parse_duration: the /commands at the top of a staff member's reply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.tickets.commands import (
    Command,
    Problem,
    StaffMail,
    parse_duration,
    read_commands,
)

KNOWN = ("/status", "/priority", "/urgent", "/assign", "/level", "/spend", "/cc", "/internal")


def only(mail: StaffMail) -> Command:
    """The single command of a mail that must have no problems."""
    assert mail.problems == ()
    assert len(mail.commands) == 1
    return mail.commands[0]


def problem(mail: StaffMail) -> Problem:
    assert len(mail.problems) == 1, mail.problems
    return mail.problems[0]


# --- every command and alias ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("/status open", "status", "open"),
        ("/status waiting", "status", "waiting_customer"),
        ("/status waiting_customer", "status", "waiting_customer"),
        ("/status pending", "status", "waiting_customer"),
        ("/status resolved", "status", "resolved"),
        ("/status closed", "status", "closed"),
        ("/close", "status", "closed"),
        ("/reopen", "status", "open"),
        ("/resolve", "status", "resolved"),
        ("/priority P1", "priority", "P1"),
        ("/priority P2", "priority", "P2"),
        ("/priority P3", "priority", "P3"),
        ("/priority 1", "priority", "P1"),
        ("/priority 2", "priority", "P2"),
        ("/priority 3", "priority", "P3"),
        ("/urgent", "urgent", True),
        ("/urgent off", "urgent", False),
        ("/urgent no", "urgent", False),
        ("/urgent false", "urgent", False),
        ("/urgent on", "urgent", True),
        ("/urgent yes", "urgent", True),
        ("/urgent true", "urgent", True),
        ("/assign me", "assign", "me"),
        ("/assign bob@support.example", "assign", "bob@support.example"),
        ("/assign Bob.Smith@Support.Example", "assign", "bob.smith@support.example"),
        ("/assign <bob@support.example>", "assign", "bob@support.example"),
        ("/level L1", "level", "L1"),
        ("/level L2", "level", "L2"),
        ("/level L3", "level", "L3"),
        ("/level 1", "level", "L1"),
        ("/level 2", "level", "L2"),
        ("/level 3", "level", "L3"),
        ("/spend 45m", "spend", 45),
        ("/spend 1h 30m", "spend", 90),
        ("/cc alice@acme.example", "cc", "alice@acme.example"),
        ("/cc <Alice@ACME.example>", "cc", "alice@acme.example"),
        ('/cc "alice"@acme.example', "cc", '"alice"@acme.example'),
        ("/internal", "internal", True),
        ("/bug", "bug", True),
    ],
)
def test_each_command_and_alias(line: str, name: str, value: object) -> None:
    assert only(read_commands(line)) == Command(1, name, value)


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("/STATUS CLOSED", "status", "closed"),
        ("/Status Pending", "status", "waiting_customer"),
        ("/status Waiting_Customer", "status", "waiting_customer"),
        ("/CLOSE", "status", "closed"),
        ("/ReOpen", "status", "open"),
        ("/Priority p2", "priority", "P2"),
        ("/URGENT OFF", "urgent", False),
        ("/Assign ME", "assign", "me"),
        ("/ASSIGN BOB@SUPPORT.EXAMPLE", "assign", "bob@support.example"),
        ("/Level l3", "level", "L3"),
        ("/SPEND 1H30M", "spend", 90),
        ("/CC Alice@Acme.Example", "cc", "alice@acme.example"),
        ("/Internal", "internal", True),
        ("/BUG", "bug", True),
    ],
)
def test_names_and_keywords_ignore_case(line: str, name: str, value: object) -> None:
    assert only(read_commands(line)) == Command(1, name, value)


def test_several_commands_keep_their_order_and_line_numbers() -> None:
    mail = read_commands(
        "/status waiting\n/priority p2\n/spend 20m\n/cc a@acme.example\n/internal\n\nHello"
    )
    assert mail.problems == ()
    assert mail.commands == (
        Command(1, "status", "waiting_customer"),
        Command(2, "priority", "P2"),
        Command(3, "spend", 20),
        Command(4, "cc", "a@acme.example"),
        Command(5, "internal", True),
    )
    assert mail.body == "Hello"


def test_extra_whitespace_around_and_inside_a_command_line() -> None:
    assert only(read_commands("   \t/status \t closed   ")) == Command(1, "status", "closed")


def test_several_cc_lines_are_each_a_command() -> None:
    mail = read_commands("/cc a@acme.example\n/cc b@acme.example")
    assert mail.problems == ()
    assert mail.commands == (
        Command(1, "cc", "a@acme.example"),
        Command(2, "cc", "b@acme.example"),
    )


def test_each_spend_line_is_its_own_entry_even_when_equal() -> None:
    mail = read_commands("/spend 30m\n/spend 30m\n/spend 1h")
    assert mail.problems == ()
    assert [(c.line, c.value) for c in mail.commands] == [(1, 30), (2, 30), (3, 60)]


# --- where the block ends -------------------------------------------------------------


def test_leading_blank_lines_and_blank_lines_between_commands() -> None:
    mail = read_commands("\n  \n/status closed\n\n\t\n/priority 1\n\n\nThanks, fixed.\n")
    assert mail.problems == ()
    assert mail.commands == (Command(3, "status", "closed"), Command(6, "priority", "P1"))
    assert mail.body == "Thanks, fixed.\n"


def test_block_ends_at_first_text_line_and_later_slash_lines_are_text() -> None:
    text = "/status waiting\nPlease try again.\n/status closed\n/spend 10h\n"
    mail = read_commands(text)
    assert mail.problems == ()
    assert mail.commands == (Command(1, "status", "waiting_customer"),)
    assert mail.body == "Please try again.\n/status closed\n/spend 10h\n"


def test_a_mail_that_starts_with_text_has_no_commands() -> None:
    mail = read_commands("Hello,\n/close\n")
    assert mail.commands == ()
    assert mail.problems == ()
    assert mail.body == "Hello,\n/close\n"


def test_text_after_commands_keeps_its_own_indentation_and_blank_lines() -> None:
    mail = read_commands("/bug\n\n    indented code\n\nsecond paragraph")
    assert mail.body == "    indented code\n\nsecond paragraph"


@pytest.mark.parametrize(
    "text",
    [
        "> /status closed\n",
        ">/status closed\n",
        "  > /close\n",
        ">> /priority 1\n",
    ],
)
def test_quoted_lines_are_never_commands(text: str) -> None:
    mail = read_commands(text)
    assert mail.commands == ()
    assert mail.problems == ()
    assert mail.body == text


def test_a_quoted_line_ends_the_block() -> None:
    mail = read_commands("/status waiting\n> /status closed\n/priority 1\n")
    assert mail.problems == ()
    assert mail.commands == (Command(1, "status", "waiting_customer"),)
    assert mail.body == "> /status closed\n/priority 1\n"


def test_windows_line_endings() -> None:
    mail = read_commands("\r\n/status closed\r\n/spend 1h30\r\n\r\nDone.\r\nBob\r\n")
    assert mail.problems == ()
    assert mail.commands == (Command(2, "status", "closed"), Command(3, "spend", 90))
    assert mail.body == "Done.\nBob\n"


def test_signature_right_after_the_commands_is_body_text() -> None:
    mail = read_commands("/close\r\n/spend 15m\r\n-- \r\nBob Smith\r\nSupport\r\n")
    assert mail.problems == ()
    assert mail.commands == (Command(1, "status", "closed"), Command(2, "spend", 15))
    assert mail.body == "-- \nBob Smith\nSupport\n"
    assert not mail.only_commands  # the caller trims the signature and decides


def test_a_leading_byte_order_mark_does_not_hide_the_first_command() -> None:
    assert only(read_commands("\ufeff/close\n")) == Command(1, "status", "closed")


# --- only_commands and internal ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/close", True),
        ("/close\n", True),
        ("/close\n\n  \n\t\n", True),
        ("/close\r\n\r\n", True),
        ("", True),
        ("/close\nThanks", False),
        ("/close\n\n\nThanks", False),
        ("Thanks", False),
    ],
)
def test_only_commands(text: str, expected: bool) -> None:
    assert read_commands(text).only_commands is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/internal\nNote to self", True),
        ("/status waiting\n/INTERNAL\nNote", True),
        ("/status waiting\nNote", False),
        ("Note\n/internal", False),  # not in the command block
        ("/internal yes\nNote", False),  # refused, so not a command
    ],
)
def test_internal(text: str, expected: bool) -> None:
    assert read_commands(text).internal is expected


def test_repeating_the_same_command_keeps_one() -> None:
    mail = read_commands(
        "/status closed\n/close\n/priority 2\n/priority P2\n/urgent\n/urgent on\n"
        "/assign me\n/assign ME\n/level 1\n/level L1\n"
        "/internal\n/internal\n/bug\n/bug\n/cc a@acme.example\n/cc A@ACME.EXAMPLE\n"
    )
    assert mail.problems == ()
    assert mail.commands == (
        Command(1, "status", "closed"),
        Command(3, "priority", "P2"),
        Command(5, "urgent", True),
        Command(7, "assign", "me"),
        Command(9, "level", "L1"),
        Command(11, "internal", True),
        Command(13, "bug", True),
        Command(15, "cc", "a@acme.example"),
    )


# --- problems ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "written"),
    [("/stauts closed", "/stauts"), ("/Priorty 1", "/priorty"), ("/var/log/syslog", "/var")],
)
def test_unknown_command_names_it_and_lists_the_known_ones(line: str, written: str) -> None:
    mail = read_commands(f"/close\n{line}\nText")
    found = problem(mail)
    assert (found.line, found.text) == (2, line)
    assert f"unknown command {written}" in found.reason
    for known in KNOWN:
        assert known in found.reason


def test_unknown_command_suggests_the_nearest() -> None:
    assert "did you mean /status?" in problem(read_commands("/stauts closed")).reason


def test_a_lone_slash_is_a_problem() -> None:
    found = problem(read_commands("/status open\n   /   \nHi"))
    assert (found.line, found.text) == (2, "/")
    assert "/status" in found.reason  # lists the known commands


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("/status", "/status"),
        ("/priority", "/priority"),
        ("/assign", "/assign"),
        ("/level", "/level"),
        ("/spend", "/spend"),
        ("/cc", "/cc"),
    ],
)
def test_missing_argument(line: str, command: str) -> None:
    found = problem(read_commands(f"\n{line}\n"))
    assert (found.line, found.text) == (2, line)
    assert found.reason.startswith(f"{command} needs a")


def test_missing_argument_says_what_is_allowed() -> None:
    assert "open, waiting, resolved or closed" in problem(read_commands("/status")).reason
    assert "P1, P2 or P3" in problem(read_commands("/priority")).reason
    assert "1h30" in problem(read_commands("/spend")).reason


@pytest.mark.parametrize(
    ("line", "command", "extra"),
    [
        ("/status closed now", "/status", "now"),
        ("/priority 1 2", "/priority", "2"),
        ("/urgent off please", "/urgent", "please"),
        ("/assign me and bob", "/assign", "and bob"),
        ("/level L2 L3", "/level", "L3"),
        ("/cc a@acme.example b@acme.example", "/cc", "b@acme.example"),
        ("/close thanks", "/close", "thanks"),
        ("/reopen now", "/reopen", "now"),
        ("/resolve it", "/resolve", "it"),
        ("/internal note", "/internal", "note"),
        ("/bug confirmed", "/bug", "confirmed"),
    ],
)
def test_extra_argument(line: str, command: str, extra: str) -> None:
    found = problem(read_commands(f"/spend 5m\n{line}"))
    assert (found.line, found.text) == (2, line)
    assert found.reason.startswith(f"{command} takes")
    assert repr(extra) in found.reason


@pytest.mark.parametrize(
    ("line", "command", "allowed"),
    [
        ("/status done", "/status", "open, waiting, resolved or closed"),
        ("/status close", "/status", "open, waiting, resolved or closed"),
        ("/priority P4", "/priority", "P1, P2 or P3"),
        ("/priority high", "/priority", "P1, P2 or P3"),
        ("/priority 0", "/priority", "P1, P2 or P3"),
        ("/level L4", "/level", "L1, L2 or L3"),
        ("/level expert", "/level", "L1, L2 or L3"),
        ("/urgent maybe", "/urgent", "off"),
    ],
)
def test_invalid_value_says_what_is_allowed(line: str, command: str, allowed: str) -> None:
    found = problem(read_commands(line))
    assert (found.line, found.text) == (1, line)
    assert found.reason.startswith(f"{command} does not accept {line.split()[1]!r}")
    assert allowed in found.reason


@pytest.mark.parametrize(
    "line",
    [
        "/assign bob",
        "/assign bob@",
        "/assign @support.example",
        "/assign <bob@support.example",
        "/assign bob@bad_domain!.example",
        "/cc alice",
        "/cc alice@acme.example,",
        "/cc <>",
        "/cc a@acme.example,b@acme.example",
        "/cc a@acme.example;b@acme.example",
        "/assign bob@support.example>",
    ],
)
def test_invalid_address(line: str) -> None:
    found = problem(read_commands(f"\n\n{line}\nHello"))
    assert (found.line, found.text) == (3, line)
    assert found.reason.startswith(line.split()[0])
    assert "email address" in found.reason


@pytest.mark.parametrize("duration", ["soon", "1x", "-5", "1.5", "1:5", "h", "1h30h"])
def test_bad_duration_names_spend_and_the_accepted_forms(duration: str) -> None:
    found = problem(read_commands(f"/status closed\n/spend {duration}\n"))
    assert (found.line, found.text) == (2, f"/spend {duration}")
    assert found.reason.startswith("/spend")
    assert "45m" in found.reason and "1h30" in found.reason and "1:30" in found.reason


@pytest.mark.parametrize("duration", ["0", "0m", "25h", "24h01", "1441"])
def test_out_of_range_duration_is_a_problem(duration: str) -> None:
    found = problem(read_commands(f"/spend {duration}"))
    assert found.reason.startswith("/spend")
    assert "minute" in found.reason or "24 hours" in found.reason


def test_problems_and_commands_together_all_lines_reported() -> None:
    mail = read_commands("/status closed\n/stauts open\n/spend forever\n/cc nobody\n/bug\n\nHi")
    assert [(p.line, p.text) for p in mail.problems] == [
        (2, "/stauts open"),
        (3, "/spend forever"),
        (4, "/cc nobody"),
    ]
    # Valid lines are still reported; the caller refuses the mail as a whole.
    assert mail.commands == (Command(1, "status", "closed"), Command(5, "bug", True))
    assert mail.body == "Hi"


def test_a_very_long_bad_value_is_shortened_in_the_reason() -> None:
    line = "/status " + "x" * 500
    found = problem(read_commands(line))
    assert found.text == line
    assert len(found.reason) < 200


# --- conflicts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/status open", "/status closed"),
        ("/close", "/reopen"),
        ("/status waiting", "/resolve"),
        ("/resolve", "/close"),
        ("/priority 1", "/priority P3"),
        ("/urgent", "/urgent off"),
        ("/urgent no", "/urgent yes"),
        ("/assign me", "/assign bob@support.example"),
        ("/assign a@support.example", "/assign b@support.example"),
        ("/level L1", "/level 2"),
    ],
)
def test_contradicting_commands_conflict_on_the_later_line(first: str, second: str) -> None:
    mail = read_commands(f"{first}\n/spend 5m\n\n{second}\nText")
    found = problem(mail)
    assert (found.line, found.text) == (4, second)
    assert found.reason.startswith(second.split()[0])
    assert "conflicts with line 1" in found.reason
    # The earlier value stands in commands; the later one is not there.
    assert [c.line for c in mail.commands] == [1, 2]


def test_each_later_contradiction_points_at_the_first_line() -> None:
    mail = read_commands("/priority 1\n/priority 2\n/priority 3")
    assert [(p.line, "conflicts with line 1" in p.reason) for p in mail.problems] == [
        (2, True),
        (3, True),
    ]


def test_different_cc_and_spend_lines_do_not_conflict() -> None:
    mail = read_commands("/cc a@acme.example\n/cc b@acme.example\n/spend 5m\n/spend 10m")
    assert mail.problems == ()
    assert len(mail.commands) == 4


def test_an_invalid_line_does_not_take_part_in_conflicts() -> None:
    mail = read_commands("/status nonsense\n/status closed")
    assert [p.line for p in mail.problems] == [1]
    assert mail.commands == (Command(2, "status", "closed"),)


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("45m", 45),
        ("45min", 45),
        ("45", 45),
        ("45 m", 45),
        ("45 min", 45),
        ("45mins", 45),
        ("45 minutes", 45),
        ("1h", 60),
        ("1H", 60),
        ("1hr", 60),
        ("2 hours", 120),
        ("1h30", 90),
        ("1h30m", 90),
        ("1h30min", 90),
        ("1h 30m", 90),
        ("1h 30", 90),
        ("1 h 30 m", 90),
        ("0h30", 30),
        ("1h05", 65),
        ("1:30", 90),
        ("0:45", 45),
        ("1.5h", 90),
        ("1,5h", 90),
        ("1.25h", 75),
        (".5h", 30),
        ("0.1h", 6),
        ("0.33h", 20),  # 19.8 minutes, rounded to the nearest minute
        ("1.5 hours", 90),
        ("  90  ", 90),
        ("090", 90),
        # boundaries: one minute to one day
        ("1", 1),
        ("1m", 1),
        ("0:01", 1),
        ("24h", 1440),
        ("1440", 1440),
        ("23h59", 1439),
        ("24:00", 1440),
        ("24.0h", 1440),
    ],
)
def test_parse_duration_accepts(text: str, minutes: int) -> None:
    assert parse_duration(text) == minutes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a duration"),
        ("   ", "not a duration"),
        ("soon", "not a duration"),
        ("1.5", "not a duration"),  # a fraction needs the unit h
        ("1.5m", "not a duration"),
        ("-5", "not a duration"),
        ("1:5", "not a duration"),
        ("1:", "not a duration"),
        ("h30", "not a duration"),
        ("1d", "not a duration"),
        ("٤٥", "not a duration"),  # only ASCII digits
        ("1h75", "under 60"),
        ("1h60m", "under 60"),
        ("1:60", "under 60"),
        ("0", "less than a minute"),
        ("0m", "less than a minute"),
        ("0h", "less than a minute"),
        ("0:00", "less than a minute"),
        ("0.001h", "less than a minute"),
        ("1441", "more than 24 hours"),
        ("24h01", "more than 24 hours"),
        ("24:01", "more than 24 hours"),
        ("25h", "more than 24 hours"),
        ("24.1h", "more than 24 hours"),
        ("9" * 20, "more than 24 hours"),
        ("9" * 5000, "too long"),
    ],
)
def test_parse_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


def test_parse_duration_error_lists_the_accepted_forms() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("a while")
    for form in ("45", "45m", "45min", "1h", "1h30", "1h30m", "1h 30m", "1:30", "1.5h", "1,5h"):
        assert form in str(caught.value)


# --- robustness ---------------------------------------------------------------------------


@given(st.text())
def test_read_commands_never_raises_and_accounts_for_every_block_line(text: str) -> None:
    mail = read_commands(text)
    lines = [c.line for c in mail.commands] + [p.line for p in mail.problems]
    assert len(lines) == len(set(lines))  # one outcome per line at most
    # The body starts at a line of text, or is empty: no leading blank lines.
    assert mail.body == "" or mail.body.split("\n")[0].strip()


@given(st.text(max_size=40))
def test_parse_duration_returns_a_day_at_most_or_raises_value_error(text: str) -> None:
    try:
        minutes = parse_duration(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 1 <= minutes <= 1440
