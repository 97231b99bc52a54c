"""build_message: the bytes of an outbound mail, its stamps and its resistance to injection."""

from __future__ import annotations

import email
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.outbound.compose import (
    build_message,
    cap_references,
    check_envelope_address,
    format_address,
    header_text,
)

WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def compose(**overrides: Any) -> bytes:
    args: dict[str, Any] = dict(
        from_="Support <support@example.com>",
        to=[format_address("Alice Martin", "alice@acme.example")],
        subject="[SUP-2026-000042] Re: Export broken",
        text="Hello Alice,\nwe are on it.\n",
        html="<p>Hello Alice,</p><p>we are on it.</p>",
        message_id="sup.42.1.abcdef@support.example.com",
        in_reply_to="CAF=abc123@mail.acme.example",
        references=["root@acme.example", "CAF=abc123@mail.acme.example"],
        reply_to="support+t0k3n@example.com",
        auto_submitted="auto-replied",
        loop_marker=("X-Mailgate-Loop", "inst1.9f8e7d"),
        date=WHEN,
    )
    args.update(overrides)
    return build_message(**args)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def header_block(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


EXPECTED_HEADERS = [
    "From", "To", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "Reply-To",
    "Auto-Submitted", "Precedence", "X-Auto-Response-Suppress", "X-Mailgate-Loop",
    "MIME-Version", "Content-Type",
]  # fmt: skip


def test_stamps_and_threading_headers() -> None:
    msg = parse(compose())
    assert list(msg.keys()) == EXPECTED_HEADERS
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Precedence"] == "bulk"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["X-Mailgate-Loop"] == "inst1.9f8e7d"
    assert msg["Message-ID"] == "<sup.42.1.abcdef@support.example.com>"
    assert msg["In-Reply-To"] == "<CAF=abc123@mail.acme.example>"
    assert msg["References"].split() == ["<root@acme.example>", "<CAF=abc123@mail.acme.example>"]
    assert msg["Reply-To"].addresses[0].addr_spec == "support+t0k3n@example.com"
    assert msg["To"].addresses[0].display_name == "Alice Martin"
    assert msg["Date"].datetime == WHEN


def test_multipart_alternative_and_text_only() -> None:
    msg = parse(compose())
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = list(msg.iter_parts())
    assert plain.get_content_type() == "text/plain" and "we are on it." in plain.get_content()
    assert html.get_content_type() == "text/html" and "<p>we are on it.</p>" in html.get_content()
    assert "MIME-Version" not in plain and "MIME-Version" not in html

    text_only = parse(compose(html=None))
    assert text_only.get_content_type() == "text/plain"
    assert text_only.get_content().replace("\r\n", "\n") == "Hello Alice,\nwe are on it.\n"


def test_no_part_can_end_the_multipart_early() -> None:
    """Text that looks like our boundaries stays text: each part reads back whole."""
    fake = "--=_0123456789abcdef01234567\n--=_0123456789abcdef01234567--\n--==\n"
    text = f"Hello,\n{fake}end of text\n"
    data = compose(text=text, html=f"<pre>{fake}</pre>", attachments=[
        ("notes.txt", "text/plain", fake.encode()), ("x.bin", "application/octet-stream", b"=_--"),
    ])  # fmt: skip
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    body, notes, blob = msg.iter_parts()
    assert body.get_body(("plain",)).get_content().replace("\r\n", "\n") == text
    assert fake in body.get_body(("html",)).get_content().replace("\r\n", "\n")
    assert notes.get_payload(decode=True) == fake.encode()
    assert blob.get_payload(decode=True) == b"=_--"
    assert msg.get_boundary() != body.get_boundary()


def test_crlf_everywhere_and_seven_bit() -> None:
    data = compose(text="Réponse\nligne 2\rligne 3\r\n.\n", html="<p>é</p>")
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", data), "bare CR or LF in the output"
    assert all(b < 0x80 for b in data), "body must be 7-bit (quoted-printable)"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert "ligne 3" in parse(data).get_body(("plain",)).get_content()


def test_undecodable_text_does_not_fail_the_mail() -> None:
    msg = parse(compose(text="caf\udce9 ok", html="<p>caf\udce9</p>", subject="caf\udce9"))
    assert "caf\ufffd ok" in msg.get_body(("plain",)).get_content()
    assert msg["Subject"] == "caf\ufffd"


def test_optional_stamps_absent_when_not_given() -> None:
    msg = parse(compose(auto_submitted=None, loop_marker=None, reply_to=None,
                        in_reply_to=None, references=[]))  # fmt: skip
    for name in ("Auto-Submitted", "X-Mailgate-Loop", "Reply-To", "In-Reply-To", "References"):
        assert name not in msg
    # Always there, even on a relayed human reply.
    assert msg["Precedence"] == "bulk"
    assert msg["X-Auto-Response-Suppress"] == "All"


def test_non_ascii_subject_and_names_are_rfc2047_encoded() -> None:
    data = compose(
        subject="[SUP-2026-000042] Re: Échec de l'export – ñandú 日本",
        to=[format_address("José Núñez", "jose@acme.example")],
        from_=format_address("Équipe Support", "support@example.com"),
    )
    head = header_block(data)
    assert head.isascii()
    assert b"=?utf-8?" in head
    msg = parse(data)
    assert msg["Subject"] == "[SUP-2026-000042] Re: Échec de l'export – ñandú 日本"
    assert msg["To"].addresses[0].display_name == "José Núñez"
    assert msg["From"].addresses[0].display_name == "Équipe Support"


@pytest.mark.parametrize(
    "subject",
    [
        "Hello\r\nBcc: victim@evil.example",
        "Hello\nBcc: victim@evil.example",
        "Hello\rBcc: victim@evil.example",
        "Hello\x85Bcc: victim@evil.example",  # C1 NEL
        "Hello\u2028Bcc: victim@evil.example",
        # Already decoded once by the inbound parser, still an encoded word:
        "Re: =?utf-8?q?a=0D=0ABcc:_victim@evil.example?=",
        "Re: =?utf-8?b?YQ0KQmNjOiB2aWN0aW1AZXZpbC5leGFtcGxl?=",
    ],
)
def test_cr_lf_in_subject_never_creates_a_header(subject: str) -> None:
    data = compose(subject=subject)
    msg = parse(data)
    assert "Bcc" not in msg
    assert list(msg.keys()) == EXPECTED_HEADERS
    assert not re.search(rb"(?im)^bcc:", header_block(data))
    assert "\r" not in msg["Subject"] and "\n" not in msg["Subject"]
    assert "victim@evil.example" in msg["Subject"]  # kept as harmless text


@pytest.mark.parametrize(
    "name",
    [
        "Alice\r\nBcc: victim@evil.example",
        "=?utf-8?q?Alice=0D=0ABcc:_victim@evil.example?=",
        'Al"ice <x@y>, victim@evil.example',
    ],
)
def test_cr_lf_in_display_name_never_creates_a_header(name: str) -> None:
    data = compose(to=[format_address(name, "alice@acme.example")],
                   from_=format_address(name, "support@example.com"))  # fmt: skip
    msg = parse(data)
    assert "Bcc" not in msg
    assert list(msg.keys()) == EXPECTED_HEADERS
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@acme.example"]
    assert [a.addr_spec for a in msg["From"].addresses] == ["support@example.com"]


def test_subject_is_capped_at_200_chars() -> None:
    msg = parse(compose(subject="[SUP-2026-000042] Re: " + "é" * 300_000))
    assert len(msg["Subject"]) <= 200
    assert msg["Subject"].startswith("[SUP-2026-000042] Re: éé")


def test_references_keep_first_and_last_ten() -> None:
    refs = [f"r{i}@acme.example" for i in range(30)]
    msg = parse(compose(references=refs, in_reply_to="r29@acme.example"))
    ids = msg["References"].split()
    assert ids == ["<r0@acme.example>"] + [f"<r{i}@acme.example>" for i in range(20, 30)]
    assert cap_references(["a@x", "b@x"]) == ["a@x", "b@x"]


def test_in_reply_to_is_appended_to_references() -> None:
    msg = parse(compose(in_reply_to="parent@acme.example", references=["root@acme.example"]))
    assert msg["References"].split() == ["<root@acme.example>", "<parent@acme.example>"]


def test_long_ids_are_not_rfc2047_encoded() -> None:
    long_id = "x" * 150 + "@acme.example"
    data = compose(in_reply_to=long_id, references=[long_id])
    assert f"In-Reply-To: <{long_id}>".encode() in data
    assert f"References: <{long_id}>".encode() in data
    assert b"=?utf-8?q?=3C" not in data


def test_unusable_inbound_ids_are_dropped_not_fatal() -> None:
    msg = parse(compose(
        in_reply_to="bad id with spaces@x",
        references=["<ok@acme.example>", "evil\r\nBcc: x@y", "ünï@x", "", "no-at-sign"],
    ))  # fmt: skip
    assert "In-Reply-To" not in msg
    assert msg["References"] == "<ok@acme.example>"
    assert "Bcc" not in msg


def test_invalid_own_message_id_is_a_bug() -> None:
    for bad in ("<abc@x>", "abc", "a b@x", "abc@x\r\nBcc: y"):
        with pytest.raises(ValueError):
            compose(message_id=bad)


def test_extra_headers_are_cleaned_and_cannot_override() -> None:
    msg = parse(compose(extra_headers={"X-Mailgate-Ticket": "SUP-2026-000042\r\nBcc: x@y"}))
    assert msg["X-Mailgate-Ticket"] == "SUP-2026-000042 Bcc: x@y"
    assert "Bcc" not in msg
    for name in ("Bcc", "To", "subject", "X-Mailgate-Loop", "Bad Name", "X:Y"):
        with pytest.raises(ValueError):
            compose(extra_headers={name: "x"})


def test_naive_date_and_bad_auto_submitted_refused() -> None:
    with pytest.raises(ValueError):
        compose(date=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        compose(auto_submitted="yes please")
    msg = parse(compose(date=datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=1)))))
    assert msg["Date"].datetime.utcoffset() == timedelta(hours=1)


def test_recipient_headers_must_be_addresses() -> None:
    for bad in (["not an address"], ["a@x, b@y"], []):
        with pytest.raises(ValueError):
            compose(to=bad)


def test_format_address() -> None:
    assert format_address(None, "alice@acme.example") == "alice@acme.example"
    assert format_address("", "alice@acme.example") == "alice@acme.example"
    assert format_address("Martin, Alice", "alice@acme.example") == (
        '"Martin, Alice" <alice@acme.example>'
    )
    assert format_address("A\r\nB", "a@x.example") == "A B <a@x.example>"
    assert len(format_address("n" * 500, "a@x.example")) < 130
    with pytest.raises(ValueError):
        format_address("A", "a@x.example\r\nRCPT TO:<evil@x>")


def test_header_text_neutralises_nested_encoded_words() -> None:
    assert header_text("Re: =?utf-8?q?Caf=C3=A9?=", 200) == "Re: Café"
    assert "\n" not in header_text("=?utf-8?q?=3D=3Futf-8=3Fq=3Fa=3D0A=3F=3D?=", 200)


HEADERISH = st.text(alphabet=' "=?\\()<>@,;:qQbB\t\r\n\x00\x85\u2028-_aé', max_size=60)


@settings(derandomize=True, database=None, max_examples=2000)
@given(value=st.text(max_size=80) | HEADERISH)
def test_header_text_is_what_the_header_parser_reads_back(value: str) -> None:
    """The invariant the generator's safety rests on: whatever it is given,
    header_text returns one line that the header parser leaves unchanged, so
    no decoding in EmailMessage can bring back a CR or LF."""
    text = header_text(value, 200)
    assert not set(text) & set("\r\n\x00")
    assert str(policy.SMTP.header_factory("Subject", text)) == text


@pytest.mark.parametrize(
    "addr",
    [
        "a@x.example\r\nRCPT TO:<evil@x>",
        "a@x.example\n",
        "a\r@x.example",
        "a\x00@x.example",
        "a b@x.example",
        " a@x.example",
        "<a@x.example>",
        "a@x.example>",
        "no-at-sign",
        "@x.example",
        "a@",
        "ü@x.example",
        "a\t@x.example",
        "a@x.example\u2028",
    ],
)
def test_check_envelope_address_refuses(addr: str) -> None:
    with pytest.raises(ValueError):
        check_envelope_address(addr)


def test_check_envelope_address_accepts_and_normalises_idn() -> None:
    assert check_envelope_address("bounces+abc=def@support.example") == (
        "bounces+abc=def@support.example"
    )
    assert check_envelope_address("jose@exämple.com") == "jose@xn--exmple-cua.com"
