"""Checklist 41: fuzzing parse + screen, and the pipeline behind them.

Properties:
- `parse_message` returns a ParsedMessage or raises ParseError, within the
  time budget, whatever the bytes; `screen` returns a Screening for every
  parsed message;
- `process` on a real installation leaves exactly one ingest record per input,
  structured mail or arbitrary bytes;
- any lines of staff commands on a reply give one outcome on the right ticket.

Hypothesis builds structurally interesting mail (headers with encoded words,
CR/LF, NUL and odd charsets; nested multiparts with bad boundaries; base64,
quoted-printable and uuencode garbage; TNEF). It runs derandomized, so CI
sees the same examples every time, and prints the failing input. A short
atheris run (this file run as a script, in a subprocess) mutates bytes from
seeds made by the same builders.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def _instrumented() -> contextlib.AbstractContextManager[object]:
    """Run as a script (the atheris harness), the pipeline is imported with
    coverage instrumentation, which is what guides atheris's mutations."""
    if __name__ != "__main__":
        return contextlib.nullcontext()
    sys.path.insert(0, str(ROOT))
    import atheris

    return atheris.instrument_imports(include=["mailgate"])


with _instrumented():
    from mailgate.pipeline.message import Envelope, ParsedMessage, ParseError
    from mailgate.pipeline.parse import parse_message
    from mailgate.pipeline.process import process
    from mailgate.pipeline.screen import ScreenContext, Screening, screen
    from mailgate.pipeline.tnef import decode_tnef
    from mailgate.tickets.tokens import Signer
    from tests.conftest import Clockwork, Installation, install_at

BUDGET_SECONDS = 2.0  # checklist 28: decided in under 2 s
SCREEN_CONTEXT = ScreenContext(
    Signer(b"fuzz" * 8), "support@example.com", Envelope(source="smtp", mail_from="a@b.example")
)


def parse_and_screen(raw: bytes) -> str:
    """The harness both fuzzers drive: one outcome, or an exception escapes.

    parse_message turns any exception into ParseError so that one bad mail
    never stops intake; that safety net is what would hide a parser bug here,
    so a ParseError caused by anything but a deliberate refusal (a limit, too
    deep for the stdlib, out of memory) fails the property with its cause.
    """
    try:
        msg = parse_message(raw)
    except ParseError as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, RecursionError | MemoryError):
            raise AssertionError(f"the parser failed: {exc}") from cause
        return f"quarantined: {exc}"
    assert isinstance(msg, ParsedMessage), type(msg)
    screening = screen(msg, SCREEN_CONTEXT)
    assert isinstance(screening, Screening), type(screening)
    return screening.outcome or "person"


# --- strategies -----------------------------------------------------------------------

CHARSETS = [
    "utf-8", "us-ascii", "iso-8859-1", "windows-1252", "koi8-r", "utf-7", "iso-2022-jp",
    "gb2312", "shift_jis", "utf-16", "unknown-8bit", "x-unknown", "bogus-charset", "punycode",
    "idna", "unicode_escape", "", '"utf-8"', "utf-8*en",
]  # fmt: skip
BREAKS = [b"\r\n", b"\n", b"\r", b"\r\n ", b"\n\t", b"\x00", b"\x0b", b"\x85", b"\xe2\x80\xa8"]
ADDRESSES = [
    b"alice@acme.example", b"Alice Martin <alice@acme.example>", b"a@b", b"<x@y.example>",
    b'"q\\"x" <a@b.example>', b"group: a@b.example, c@d.example;", b"@", b"<<>>", b"a@@b",
    b"=?utf-8?q?a=40b?= <c@d.example>", b"mailer-daemon@x.example", b"support@example.com",
    b"a@[127.0.0.1]", b"\xc3\xa9@\xc3\xa9.example", b"a@xn--e1afmkfd.example",
]  # fmt: skip
HEADER_NAMES = [
    b"From", b"To", b"Cc", b"Reply-To", b"Sender", b"Subject", b"Message-ID", b"References",
    b"In-Reply-To", b"Date", b"Auto-Submitted", b"Precedence", b"List-Id", b"Return-Path",
    b"X-Auto-Response-Suppress", b"X-Mailgate-Loop", b"Authentication-Results",
    b"Importance", b"X-Priority", b"DKIM-Signature", b"Content-Type", b"X-\xff\xfe",
]  # fmt: skip

short_bytes = st.binary(max_size=24)
ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=24).map(
    str.encode
)


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    charset = draw(st.sampled_from(CHARSETS)).encode()
    payload = draw(short_bytes | ascii_text | st.sampled_from(BREAKS))
    kind = draw(st.sampled_from(["b", "q", "B", "Q", "x"]))
    if kind in "bB":
        text = base64.b64encode(payload)
        text = draw(st.sampled_from([text, text.rstrip(b"="), text[:-1], b"!!" + text]))
    elif kind in "qQ":
        text = binascii.b2a_qp(payload, header=True).replace(b"\n", b"=0A")
        text = draw(st.sampled_from([text, text + b"=Z", text.replace(b"=", b"=\r\n")]))
    else:
        text = payload
    return b"=?" + charset + b"?" + kind.encode() + b"?" + text + b"?="


header_atoms = st.one_of(
    ascii_text, short_bytes, encoded_words(), st.sampled_from(BREAKS), st.sampled_from(ADDRESSES)
)
header_values = st.lists(header_atoms, max_size=6).map(b" ".join)


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    names = st.sampled_from(HEADER_NAMES) | st.from_regex(rb"\A[!-9;-~]{1,12}\Z")
    fields = draw(st.lists(st.tuples(names, header_values), max_size=8))
    sender = draw(st.sampled_from(ADDRESSES))
    lines = [b"From: " + sender] + [name + b": " + value for name, value in fields]
    return b"".join(line + b"\r\n" for line in lines)


@dataclass(frozen=True)
class Part:
    headers: bytes  # Content-* lines, each ending in CRLF
    body: bytes


LEAF_TYPES = [
    b"text/plain", b"text/html", b"application/octet-stream", b"application/ms-tnef",
    b"image/png", b"text/calendar", b"message/delivery-status", b"text/rfc822-headers",
    b"multipart/mixed", b"application/zip", b"text/plain; format=flowed; delsp=yes",
]  # fmt: skip
ENCODINGS = [b"7bit", b"8bit", b"binary", b"base64", b"quoted-printable", b"x-uuencode", b"bogus"]
DISPOSITIONS = [
    b"", b"Content-Disposition: inline\r\n", b"Content-Disposition: attachment\r\n",
    b'Content-Disposition: attachment; filename="../../etc/x"\r\n',
    b"Content-Disposition: attachment; filename*=utf-8''a%0D%0ABcc%3A%20x%00.pdf\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''a; filename*1=b.txt\r\n",
    b'Content-Disposition: attachment; filename="=?utf-8?q?CON=0D=0A?="\r\n',
    b'Content-Disposition: attachment; filename="winmail.dat"\r\n',
]  # fmt: skip


def tnef_bytes(body: bytes, name: bytes, data: bytes, cut: int) -> bytes:
    """A small TNEF stream (see test_hostile), cut short or not."""
    from tests.test_hostile import tnef_stream

    stream = tnef_stream(body.decode("ascii"), [(name, data)])
    return stream[: len(stream) - cut] if cut else stream


@st.composite
def leaves(draw: st.DrawFn) -> Part:
    ctype = draw(st.sampled_from(LEAF_TYPES))
    charset = draw(st.sampled_from(CHARSETS)).encode()
    cte = draw(st.sampled_from(ENCODINGS))
    if ctype == b"application/ms-tnef":
        payload = tnef_bytes(draw(ascii_text), draw(short_bytes), draw(short_bytes),
                             draw(st.integers(0, 12)))  # fmt: skip
    else:
        payload = draw(st.binary(max_size=120) | ascii_text | header_values)
    body = _encode(payload, cte, draw(st.booleans()))
    headers = b"Content-Type: " + ctype + b"; charset=" + charset + b"\r\n"
    headers += b"Content-Transfer-Encoding: " + cte + b"\r\n" + draw(st.sampled_from(DISPOSITIONS))
    return Part(headers, body)


def _encode(payload: bytes, cte: bytes, well_formed: bool) -> bytes:
    if not well_formed:
        return payload + b"\r\n=ZZ!!@@\r\n"
    if cte == b"base64":
        return base64.encodebytes(payload).replace(b"\n", b"\r\n")
    if cte == b"quoted-printable":
        return binascii.b2a_qp(payload).replace(b"\n", b"\r\n")
    if cte == b"x-uuencode":
        return b"begin 644 f\r\n" + binascii.b2a_uu(payload[:45]) + b"`\r\nend\r\n"
    return payload


@st.composite
def containers(draw: st.DrawFn, children: st.SearchStrategy[list[Part]]) -> Part:
    kids = draw(children)
    if draw(st.integers(0, 4)) == 0:
        # message/rfc822 around the first child: a mail inside the mail
        inner = draw(header_blocks()) + kids[0].headers + b"\r\n" + kids[0].body
        return Part(b"Content-Type: message/rfc822\r\n", inner)
    subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related", b"report", b"digest"]))
    boundary = draw(st.sampled_from([b"b1", b"=_x_=", b"", b"a b", b"--", b"x" * 80]))
    declared = draw(
        st.sampled_from(
            [
                b'; boundary="' + boundary + b'"',
                b"; boundary=" + boundary,
                b"; boundary*=utf-8''" + boundary,
                b"",  # no boundary at all
                b'; boundary="' + boundary + b'"; boundary="other"',
            ]
        )
    )
    used = draw(st.sampled_from([boundary, boundary, b"other", boundary + b" "]))
    closed = draw(st.booleans())
    body = b"preamble\r\n"
    for kid in kids:
        body += b"--" + used + b"\r\n" + kid.headers + b"\r\n" + kid.body + b"\r\n"
    if closed:
        body += b"--" + used + b"--\r\nepilogue\r\n"
    return Part(b"Content-Type: multipart/" + subtype + declared + b"\r\n", body)


bodies = st.recursive(
    leaves(), lambda children: containers(st.lists(children, min_size=1, max_size=4)), max_leaves=10
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    part = draw(bodies)
    raw = draw(header_blocks()) + b"MIME-Version: 1.0\r\n" + part.headers + b"\r\n" + part.body
    if draw(st.booleans()):
        raw = raw.replace(b"\r\n", b"\n")  # what a pipe from a Unix MTA delivers
    return raw


# --- hypothesis ---------------------------------------------------------------------

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,  # derandomized: the same examples each run, nothing to remember
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@settings(FUZZ, max_examples=400)
@given(raw=messages())
def test_parse_and_screen_give_one_outcome_for_any_structure(raw: bytes) -> None:
    note(f"raw={raw!r}")
    started = time.monotonic()
    outcome = parse_and_screen(raw)
    assert outcome
    assert time.monotonic() - started < BUDGET_SECONDS


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=2000))
def test_parse_and_screen_give_one_outcome_for_any_bytes(raw: bytes) -> None:
    note(f"raw={raw!r}")
    assert parse_and_screen(raw)


TNEF_DAMAGE = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "count"]),
        st.floats(0, 1),  # where, as a fraction of the stream
        st.sampled_from([0, 1, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]),
    ),
    min_size=1,
    max_size=6,
)


def damaged(stream: bytes, damage: list[tuple[str, float, int]]) -> bytes:
    data = bytearray(stream)
    for kind, where, value in damage:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[at] ^= value & 0xFF or 1
        elif kind == "insert":
            data[at:at] = bytes([value & 0xFF]) * 3
        elif kind == "delete":
            del data[at : at + 1 + value % 7]
        else:  # a length or count field, wherever it may be, claiming too much
            data[at : at + 4] = struct.pack("<I", value)
    return bytes(data)


@settings(FUZZ, max_examples=300)
@given(damage=TNEF_DAMAGE)
def test_tnef_decoder_reads_or_declines_any_damaged_stream(damage: list) -> None:
    from tests.test_hostile import rich_tnef_stream

    stream = damaged(rich_tnef_stream(), damage)
    note(f"stream={stream!r}")
    started = time.monotonic()
    content = decode_tnef(stream)  # raises nothing
    assert time.monotonic() - started < BUDGET_SECONDS
    for attachment in content.attachments if content else ():
        name = attachment.filename
        assert name and not set(name) & set("/\\\0") and len(name.encode()) <= 255


@pytest.fixture(scope="module")
def fuzz_inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """One installation for every example: a fresh one each would cost more than the example."""
    yield install_at(tmp_path_factory.mktemp("fuzz"), Clockwork())


@settings(FUZZ, max_examples=80)
@given(raw=st.one_of(messages(), st.binary(max_size=2000)))  # bytes: no header field at all
def test_every_input_leaves_exactly_one_ingest_record(fuzz_inst: Installation, raw: bytes) -> None:
    note(f"raw={raw!r}")
    before = fuzz_inst.ingest_records()
    result = process(fuzz_inst.app, raw, Envelope(source="smtp", mail_from="a@b.example"))
    assert fuzz_inst.ingest_records() == before + 1
    assert result.outcome in {
        "created", "threaded", "command", "rejected", "ignored", "bounce", "duplicate",
        "quarantined",
    }  # fmt: skip


COMMANDS = [
    "/status",
    "/close",
    "/reopen",
    "/resolve",
    "/priority",
    "/urgent",
    "/assign",
    "/level",
    "/spend",
    "/cc",
    "/internal",
    "/workaround",
    "/bug",
    "/",
    "/STATUS",
]
ARGUMENTS = ["open", "waiting", "resolved", "closed", "P1", "P0", "p2", "off", "me", "L1", "L9",
             "bob@support.example", "alice@acme.example", "hank@globex.example", "eve@x",
             "45m", "1h30", "0m", "-5m", "99999h", "1h61", "1.5h", "", "\u00a0", "x" * 300,
             "=?utf-8?q?=0D=0A?=", "3:00"]  # fmt: skip
COMMAND_LINE = st.builds(
    lambda command, args: " ".join([command, *args]).rstrip(),
    st.sampled_from(COMMANDS),
    st.lists(st.sampled_from(ARGUMENTS), max_size=2),
)


@pytest.fixture(scope="module")
def staff_inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    from tests.conftest import NO_LOOP_LIMITS

    yield install_at(tmp_path_factory.mktemp("staff"), Clockwork(), NO_LOOP_LIMITS)


@settings(FUZZ, max_examples=40)
@given(lines=st.lists(COMMAND_LINE, min_size=1, max_size=4), text=st.booleans())
def test_any_staff_command_lines_give_one_outcome(
    staff_inst: Installation, lines: list[str], text: bool
) -> None:
    """Whatever a staff member types at the top of a reply, on a fresh ticket."""
    from tests.conftest import make_mail, staff_answer

    inst = staff_inst
    opened = inst.ingest(make_mail(message_id=f"cmd-{time.monotonic_ns()}@acme.example"))
    body = "\n".join(lines) + ("\n\nThe answer.\n" if text else "\n")
    note(f"body={body!r}")
    mid = f"bob-{time.monotonic_ns()}@support.example"
    result = inst.ingest(staff_answer(inst, body, mid, ticket=opened.ticket))
    assert result.outcome in {"threaded", "command", "rejected"}, result
    assert result.ticket == opened.ticket


# --- atheris ----------------------------------------------------------------------------


def seeds() -> list[bytes]:
    """A few mails from the builders above and in test_hostile, for atheris to mutate."""
    from tests.conftest import make_mail
    from tests.test_hostile import many_attachments_mail, nested_mail, tnef_stream

    winmail = make_mail(body="", message_id="seed-tnef@acme.example")
    winmail.add_attachment(tnef_stream("body", [(b"a.txt", b"a")]), maintype="application",
                           subtype="ms-tnef", filename="winmail.dat")  # fmt: skip
    return [
        make_mail().as_bytes(),
        b"From: =?utf-8?q?Alice=0D=0ABcc=3A_x?= <alice@acme.example>\r\nTo: support@example.com"
        b"\r\nSubject: =?utf-8?q?a=0D=0ABcc:_x?= =?koi8-r?b?8tXT08vJyg==?=\r\n"
        b"Message-ID: <s1@acme.example>\r\nReferences: <a@b> <c@d>\r\n\r\nbody\r\n",
        winmail.as_bytes(),
        nested_mail(3),
        many_attachments_mail(2),
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/html; "
        b"charset=utf-7\n\n+ADw-script+AD4-\n--x--\n",
    ]


@pytest.mark.slow
def test_atheris_finds_no_unhandled_exception(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    run = subprocess.run(
        [sys.executable, __file__, "-runs=30000", "-max_total_time=4", "-timeout=5",
         "-max_len=8192", "-seed=41", f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    report = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert "Done" in run.stderr, report  # libFuzzer's closing line: the run did happen


def _atheris_main() -> None:
    import atheris

    def one_input(data: bytes) -> None:
        try:
            parse_and_screen(data)
        except Exception:
            print(f"input={data!r}", file=sys.stderr)
            raise

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    _atheris_main()
