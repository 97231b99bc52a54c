"""Hostile mail (RELIABILITY §5, checklist 28–34): every shape is answered,
recorded with the limit it breaks or stored harmlessly, and nothing it
carries reaches a header we send, a path outside data_dir or the network.

The shapes are built here, and bench/hostile.py times the same builders.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import random
import re
import struct
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailgate.store.models import Article, IngestRecord, OutboxMail, Ticket
from tests.conftest import Installation, make_mail, staff_answer
from tests.daemon import RunningDaemon, start_daemon
from tests.smtp_sink import Sink

# --- the shapes -------------------------------------------------------------------

CRLF = b"\r\n"


def head(message_id: str, subject: bytes = b"Printer jammed", extra: bytes = b"") -> bytes:
    """An admin's header block (alice is an acme admin in directory.yaml)."""
    return (
        b"From: Alice Martin <alice@acme.example>\r\nTo: support@example.com\r\n"
        b"Subject: " + subject + b"\r\nDate: Mon, 23 Nov 2026 09:15:00 +0100\r\n"
        b"Message-ID: <" + message_id.encode() + b">\r\nMIME-Version: 1.0\r\n" + extra
    )


def nested_mail(levels: int) -> bytes:
    """`levels` multiparts, each the only part of its parent."""
    out = [head(f"nest{levels}@acme.example")]
    for i in range(levels):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\nat the bottom\r\n")
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(levels)))
    return b"".join(out)


def many_parts_mail(parts: int) -> bytes:
    out = [head(f"parts{parts}@acme.example"), b'Content-Type: multipart/mixed; boundary="p"\r\n']
    out.extend(b"\r\n--p\r\nContent-Type: text/plain\r\n\r\npart %d" % i for i in range(parts))
    out.append(b"\r\n--p--\r\n")
    return b"".join(out)


def big_header_mail(size: int) -> bytes:
    """One field (not the Subject) folded over `size` bytes."""
    lines = b"".join(b"\t" + b"y" * 76 + CRLF for _ in range(size // 79))
    return head(f"header{size}@acme.example", extra=b"X-Filler: start\r\n" + lines) + (
        b"\r\nThe header above is the problem.\r\n"
    )


def many_to_mail(addresses: int) -> bytes:
    to = b",\r\n ".join(b"user%d@acme.example" % i for i in range(addresses))
    raw = head(f"to{addresses}@acme.example") + b"\r\nSo many people.\r\n"
    return raw.replace(b"To: support@example.com", b"To: support@example.com,\r\n " + to, 1)


def long_subject_mail(size: int) -> bytes:
    """A plain subject folded over `size` bytes: long, but no attack."""
    words = b"\r\n ".join(b"word%05d" % i for i in range(size // 11))
    return head(f"subject{size}@acme.example", subject=b"Help " + words) + b"\r\nHello.\r\n"


def many_attachments_mail(count: int, size: int = 100) -> bytes:
    rng = random.Random(count)  # incompressible and reproducible
    out = [
        head(
            f"att{count}x{size}@acme.example",
            extra=b'Content-Type: multipart/mixed; boundary="a"\r\n',
        )
    ]
    out.append(b"\r\n--a\r\nContent-Type: text/plain\r\n\r\nFiles attached.\r\n")
    for i in range(count):
        out.append(
            b"--a\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
            b'\r\nContent-Disposition: attachment; filename="file%d.bin"\r\n\r\n' % i
        )
        out.append(base64.encodebytes(rng.randbytes(size)).replace(b"\n", CRLF))
    out.append(b"--a--\r\n")
    return b"".join(out)


def normal_mail(size: int = 10_000) -> bytes:
    """The baseline: a 10 KB text mail."""
    line = b"Since this morning nobody on the third floor can print anything.\r\n"
    return head("normal@acme.example") + b"\r\n" + line * (size // len(line))


# name -> (mail, what the recorded reason must say)
OVER_LIMITS: dict[str, tuple[Callable[[], bytes], str]] = {
    "nesting-100": (lambda: nested_mail(100), "50-level nesting limit"),
    "nesting-1000": (lambda: nested_mail(1000), "50-level nesting limit"),
    "parts-5000": (lambda: many_parts_mail(5000), "500-part limit"),
    "header-100KB": (lambda: big_header_mail(100_000), "65536-byte header limit"),
    "to-20000": (lambda: many_to_mail(20_000), "over the 1000-address limit"),
}


def attachments_mail(count: int, size: int = 10) -> bytes:
    mail = make_mail(message_id=f"att{count}-{size}@acme.example")
    for i in range(count):
        mail.add_attachment(bytes(size), maintype="application", subtype="octet-stream",
                            filename=f"f{i}.bin")  # fmt: skip
    return mail.as_bytes()


# name -> (a mail at the limit, one just past it, what the reason must say); the
# limits are the shipped settings.yaml's, but max_attachment_bytes (1000 here).
AT_AND_PAST_LIMITS: dict[str, tuple[Callable[[], bytes], Callable[[], bytes], str]] = {
    # the multipart itself and its parts: 500 parts in all, then 501
    "parts": (lambda: many_parts_mail(499), lambda: many_parts_mail(500), "500-part limit"),
    # multiparts and the text at the bottom: 50 levels, then 51
    "depth": (lambda: nested_mail(49), lambda: nested_mail(50), "50-level nesting limit"),
    "attachments": (
        lambda: attachments_mail(100),
        lambda: attachments_mail(101),
        "100-attachment limit",
    ),
    "attachment bytes": (
        lambda: attachments_mail(2, 500),
        lambda: attachments_mail(1, 1001),
        "1000-byte attachment size limit",
    ),
}


@pytest.mark.parametrize("limit", AT_AND_PAST_LIMITS)
def test_a_mail_at_a_limit_is_a_ticket_and_one_past_it_is_quarantined(
    install: Callable[..., Installation], limit: str
) -> None:
    inst = install(settings={"hygiene": {"limits": {"max_attachment_bytes": 1000}}})
    at_limit, past_limit, reason = AT_AND_PAST_LIMITS[limit]
    assert inst.ingest(at_limit()).outcome == "created"
    result = inst.ingest(past_limit())
    assert result.outcome == "quarantined" and reason in (result.reason or "")


# --- checklist 28, through the daemon's SMTP listener -------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """One `mailgate run` for every shape: starting one costs more than a shape."""
    sink = Sink().start()
    running = start_daemon(tmp_path_factory.mktemp("hostile-daemon"), sink)
    yield running
    running.stop()
    sink.stop()


def send_timed(daemon: RunningDaemon, raw: bytes) -> tuple[int, str, float]:
    """SMTP reply code, text and the seconds from DATA to the reply."""
    with daemon.smtp() as client:
        client.ehlo("client.example")
        client.mail("alice@acme.example")
        client.rcpt("support@example.com")
        started = time.monotonic()
        code, reply = client.data(raw)
        return code, reply.decode(), time.monotonic() - started


def ingest_record(inst: Installation, reply: str) -> IngestRecord:
    match = re.search(r"\(#(\d+)\)", reply)
    assert match, reply
    with inst.session() as s:
        record = s.get(IngestRecord, int(match.group(1)))
        assert record is not None
        return record


def peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1)) * 1024


@pytest.mark.parametrize("shape", OVER_LIMITS)
def test_over_limit_mail_is_quarantined_quickly_and_the_daemon_keeps_serving(
    daemon: RunningDaemon, shape: str
) -> None:
    build, limit = OVER_LIMITS[shape]
    raw = build()
    code, reply, seconds = send_timed(daemon, raw)
    assert code == 250, reply  # we took responsibility: recorded, the raw mail kept
    record = ingest_record(daemon.inst, reply)
    assert record.outcome == "quarantined"
    assert limit in record.reason
    assert daemon.inst.app.blobs.get(record.raw_sha256) == raw
    assert seconds < 2.0, f"{shape} took {seconds:.2f} s"
    assert peak_rss_bytes(daemon.proc.pid) < 500 * 1024 * 1024
    # and an admin's ordinary mail right after still opens a ticket
    after = make_mail(subject=f"after {shape}", message_id=f"after-{shape}@acme.example")
    code, reply, _ = send_timed(daemon, after.as_bytes())
    assert code == 250 and ingest_record(daemon.inst, reply).outcome == "created"


# --- the list, through the pipeline -----------------------------------------


def only_ingest_record(inst: Installation) -> IngestRecord:
    with inst.session() as s:
        records = list(s.scalars(select(IngestRecord)))
    assert len(records) == 1
    return records[0]


def count(inst: Installation, model: type) -> int:
    with inst.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def inbound_article(inst: Installation) -> Article:
    with inst.session() as s:
        article = s.scalar(select(Article).where(Article.direction == "in"))
        assert article is not None
        article.attachments  # noqa: B018 - load while the session is open
        return article


def test_a_210_kb_subject_is_stored_truncated_and_the_ack_subject_capped(
    inst: Installation,
) -> None:
    raw = long_subject_mail(210_000)
    assert len(raw) > 210_000
    result = inst.ingest(raw)
    assert result.outcome == "created"
    with inst.session() as s:
        subject = s.scalar(select(Ticket.subject))
    assert subject.startswith("Help word00000 word00001") and len(subject) <= 998
    assert len(only_ingest_record(inst).subject) <= 998
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    assert "word00000" in ack["Subject"] and len(ack["Subject"]) <= 200


def test_300_attachments_are_quarantined_and_the_mail_kept(inst: Installation) -> None:
    raw = many_attachments_mail(300)
    result = inst.ingest(raw)
    assert result.outcome == "quarantined"
    assert "100-attachment limit" in result.reason
    record = only_ingest_record(inst)
    assert (record.outcome, record.reason) == (result.outcome, result.reason)
    assert inst.app.blobs.get(record.raw_sha256) == raw
    assert count(inst, Ticket) == 0 and count(inst, OutboxMail) == 0


def test_attachments_over_the_total_size_limit_are_quarantined(install) -> None:
    inst = install({"hygiene": {"limits": {"max_attachment_bytes": 300_000}}})
    # each under the limit alone, together over it: the limit is on the sum
    result = inst.ingest(many_attachments_mail(3, size=120_000))
    assert result.outcome == "quarantined"
    assert "300000-byte attachment size limit" in result.reason
    under = inst.ingest(many_attachments_mail(2, size=120_000))
    assert under.outcome == "created"
    assert [a.size for a in inbound_article(inst).attachments] == [120_000, 120_000]


def test_one_attachment_far_over_the_size_limit_is_quarantined(install) -> None:
    inst = install({"hygiene": {"limits": {"max_attachment_bytes": 1024 * 1024}}})
    result = inst.ingest(many_attachments_mail(1, size=3 * 1024 * 1024))
    assert result.outcome == "quarantined"
    assert "1048576-byte attachment size limit" in result.reason


# CR, LF and every other character Python's str.splitlines() breaks on.
LINE_BREAKS = [
    "\r\n",
    "\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
]


def encoded_word_with_injections(prefix: str) -> str:
    """An RFC 2047 word that decodes to `prefix`, then each line break followed by a header."""
    text = prefix + "".join(f"{br}X-Injected-{i}: yes" for i, br in enumerate(LINE_BREAKS))
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


# C0 (CR and LF among them), DEL and C1: no header value we send carries one.
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def assert_nothing_injected(mails: list[EmailMessage]) -> None:
    assert mails
    for mail in mails:
        names = [name.lower() for name in mail]
        assert not [n for n in names if n.startswith("x-injected") or n == "bcc"], names
        for part in mail.walk():
            for name, value in part.items():
                assert not CONTROLS.search(str(value)), (name, value)


INJECTIONS = {
    "subject, encoded word": lambda raw: raw.replace(
        b"Subject: Cannot log in",
        b"Subject: " + encoded_word_with_injections("Help").encode(),
    ),
    # NUL, a terminal escape, DEL, C1 NEL and C1 CSI (an 8-bit terminal escape):
    # printed by whoever reads our subject line
    "subject, encoded controls": lambda raw: raw.replace(
        b"Subject: Cannot log in", b"Subject: =?utf-8?q?Help=00me=1B[31m_now=7F=C2=85=C2=9B1m?="
    ),
    "subject, bare CR": lambda raw: raw.replace(
        b"Subject: Cannot log in", b"Subject: Help\rBcc: victim@evil.example"
    ),
    "from name, encoded word": lambda raw: raw.replace(
        b"From: Alice Martin <",
        b"From: " + encoded_word_with_injections("Alice").encode() + b" <",
    ),
    "message-id and references, raw CR and LF": lambda raw: raw.replace(
        b"Message-ID: <req-1@acme.example>",
        b"Message-ID: <req-1@acme.example\rBcc: victim@evil.example>\r\n"
        b"References: <a@acme.example>\nBcc: victim@evil.example\r\n"
        b"In-Reply-To: <b@acme.example\r\n Bcc: victim@evil.example>",
    ),
}


@pytest.mark.parametrize("where", INJECTIONS)
def test_line_breaks_in_inbound_fields_never_reach_a_header_we_send(
    inst: Installation, where: str
) -> None:
    raw = INJECTIONS[where](make_mail().as_bytes())
    result = inst.ingest(raw)
    assert result.outcome == "created", result.reason
    sent = inst.sent()
    assert len(sent) == 2  # the ack and the staff notice: nothing failed to build
    assert_nothing_injected(sent)
    # What staff see of it in a listing or a terminal is as clean as our headers,
    # U+2028/U+2029 too (outbound header encoding alone would hide their loss).
    with inst.session() as s:
        subject = s.scalars(select(Ticket.subject)).one()
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", subject), subject


def test_line_breaks_in_a_relayed_attachment_name_never_reach_its_header(
    inst: Installation,
) -> None:
    """A staff reply's attachments go to the customer: their names become
    Content-Disposition parameters (RFC 2231 and RFC 2047 forms here)."""
    inst.ingest(make_mail())
    staff_reply = staff_answer(inst, "The fix is attached.\n", "b1@support.example")
    staff_reply.add_attachment(b"a", maintype="application", subtype="pdf", filename="ONE")
    staff_reply.add_attachment(b"b", maintype="application", subtype="pdf", filename="TWO")
    raw = staff_reply.as_bytes()
    raw = raw.replace(
        b'filename="ONE"', b"filename*=utf-8''fix%0D%0ABcc%3A%20victim%40evil.example.pdf"
    )
    raw = raw.replace(
        b'filename="TWO"', b'filename="' + encoded_word_with_injections("b").encode() + b'"'
    )
    assert inst.ingest(raw).outcome == "threaded"
    relayed = [m for m in inst.sent() if m["To"] == "alice@acme.example"][-1]
    names = [part.get_filename() for part in relayed.iter_attachments()]
    assert len(names) == 2 and names[0].startswith("fix")
    assert_nothing_injected([relayed])


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_traversal_and_device_names_in_every_encoding_stay_inside_data_dir(
    inst: Installation,
) -> None:
    """Extends test_pipeline's plain-parameter case: the same names hidden in
    RFC 2231 and RFC 2047 forms, NUL, and a 600-character multibyte name."""
    mail = make_mail()
    names = {
        "N1": b"filename*=utf-8''..%2F..%2Fetc%2Fx",
        "N2": b'filename="=?utf-8?q?..=5Cwin.ini?="',
        "N3": b"filename*=utf-8''nul%00name.txt",
        "N4": b'filename="CON"; name="CON.txt"',
        "N5": b"filename*=utf-8''" + b"%C3%A9" * 600 + b".pdf",
        "N6": b'filename="/abs/path\x00.sh"',
        "N7": b"filename*=utf-8''invoice%E2%80%AEfdp.exe",  # shown as "invoiceexe.pdf"
        "N8": b'filename=".htaccess"',  # a hidden file once saved
        "N9": b'filename="notes.txt:payload.exe"',  # an NTFS alternate data stream
        "N10": b"filename*=utf-8''report." + b"x" * 300,  # no extension worth keeping
    }
    for placeholder in names:
        mail.add_attachment(placeholder.encode(), maintype="application",
                            subtype="octet-stream", filename=placeholder)  # fmt: skip
    raw = mail.as_bytes()
    for placeholder, parameter in names.items():
        raw = raw.replace(f'filename="{placeholder}"'.encode(), parameter)
    data_dir = inst.app.settings.path(inst.app.settings.data_dir).resolve()
    before = tree(inst.root)
    assert inst.ingest(raw).outcome == "created"
    rows = inbound_article(inst).attachments
    assert len(rows) == len(names)
    for row in rows:
        assert not set(row.filename) & set("/\\\0\u202e:") and len(row.filename.encode()) <= 255
        assert not row.filename.startswith(".")
        assert row.filename.split(".")[0].upper() not in ("CON", "NUL", "")
        path = inst.app.blobs.path_for(row.sha256)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name == row.sha256
    assert rows[4].filename.endswith(".pdf") and rows[4].filename.startswith("éé")
    assert rows[9].filename.startswith("report.xxx")  # cut at the end, its name kept
    new = tree(inst.root) - before
    assert new and all(p.resolve().is_relative_to(data_dir) for p in new), sorted(new)
    blobs = [p for p in new if "blobs" in p.parts]
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.name) for p in blobs)


# --- checklist 33: archives are stored, never expanded ----------------------------


def zip_bomb() -> bytes:
    """Two levels, as 42.zip: 40 MiB of zeros deflated, inside another zip (~41 KB)."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("zeros.bin", bytes(40 * 1024 * 1024))
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as z:
        z.writestr("level1.zip", inner.getvalue())
    return outer.getvalue()


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in tree(root))


def test_a_zip_bomb_is_stored_as_one_blob_and_never_expanded(inst: Installation) -> None:
    bomb = zip_bomb()
    assert 35_000 < len(bomb) < 50_000
    gz = gzip.compress(bytes(40 * 1024 * 1024), compresslevel=9)
    mail = make_mail(body="Logs attached.\n")
    mail.add_attachment(bomb, maintype="application", subtype="zip", filename="42.zip")
    mail.add_attachment(gz, maintype="application", subtype="gzip", filename="logs.gz")
    raw = mail.as_bytes()
    data_dir = inst.app.settings.path(inst.app.settings.data_dir)
    blobs_before = disk_usage(data_dir / "blobs")
    assert inst.ingest(raw).outcome == "created"
    rows = inbound_article(inst).attachments
    assert [(r.filename, r.size) for r in rows] == [("42.zip", len(bomb)), ("logs.gz", len(gz))]
    assert inst.app.blobs.get(rows[0].sha256) == bomb
    # the raw mail and the two archives, nothing else: 40 MiB expanded would show
    growth = disk_usage(data_dir / "blobs") - blobs_before
    assert growth == len(raw) + len(bomb) + len(gz)
    assert disk_usage(data_dir) < 5 * 1024 * 1024


# --- checklist 34: active HTML ------------------------------------------------------


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        type(self).hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def beacon_host() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server standing in for a tracker: (base URL, paths requested)."""
    handler = type("Handler", (_CountingHandler,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    server.shutdown()
    server.server_close()


def test_active_html_is_stripped_and_nothing_is_fetched(
    inst: Installation, beacon_host: tuple[str, list[str]]
) -> None:
    url, hits = beacon_host
    html = (
        f'<html><head><link rel="stylesheet" href="{url}/css">'
        f"<style>@import url({url}/import);</style></head>"
        f'<body background="{url}/background"><p onclick="steal()" onmouseover="steal()">Hello'
        "<script>alert('script')</script>"
        f'<a href="javascript:alert(1)">click</a> <a href=" JaVaScRiPt:alert(2)">again</a>'
        f'<img src="{url}/beacon.gif" onerror="alert(3)"><img srcset="{url}/srcset 2x">'
        f'<span style="background:url({url}/style)">styled</span>'
        f'<iframe src="{url}/frame"></iframe><video poster="{url}/poster"></video>'
        "<svg><script>alert('svg')</script></svg></p>"
        # nh3 checks the scheme of href and src only: a cite is ours to check.
        '<blockquote cite="javascript:alert(4)">quoted</blockquote></body></html>'
    )
    utf7 = b"+ADw-script+AD4-alert('utf7')+ADw-/script+AD4-Still here"
    # Two inline HTML parts, the second in UTF-7, which decodes to a <script>.
    raw = (
        head("html@acme.example", extra=b'Content-Type: multipart/mixed; boundary="h"\r\n')
        + b"\r\n--h\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        + html.encode()
        + b"\r\n--h\r\nContent-Type: text/html; charset=utf-7\r\n\r\n"
        + utf7
        + b"\r\n--h--\r\n"
    )
    assert inst.ingest(raw).outcome == "created"
    stored = inbound_article(inst).html or ""
    # the text itself survives
    assert "Hello" in stored and "Still here" in stored and "quoted" in stored
    for bad in ("<script", "alert", "onclick", "onmouseover", "onerror", "javascript:",
                "JaVaScRiPt", url, "+ADw-", "<iframe", "<link", "<style"):  # fmt: skip
        assert bad not in stored, bad
    inst.sent()  # the ack and the staff notice are rendered and sent
    assert hits == []
    # the host was reachable all along: a fetch would have been counted
    urllib.request.urlopen(f"{url}/probe", timeout=5).close()
    assert hits == ["/probe"]


def test_a_link_or_inline_image_written_with_leading_space_is_kept(inst: Installation) -> None:
    """Browsers ignore whitespace before a URL, and so do some HTML generators
    when they write one: such a link is still the sender's link, and such an
    image still the mail's own part."""
    html = '<p>See <a href=" https://kb.example/printers">the guide</a><img src="\tcid:logo@x"></p>'
    raw = head("spaced@acme.example", extra=b"Content-Type: text/html; charset=utf-8\r\n")
    assert inst.ingest(raw + b"\r\n" + html.encode()).outcome == "created"
    stored = inbound_article(inst).html or ""
    assert 'href=" https://kb.example/printers"' in stored
    assert 'src="\tcid:logo@x"' in stored


# --- TNEF (winmail.dat) ---------------------------------------------------------------

LEVEL_MESSAGE, LEVEL_ATTACHMENT = 1, 2
# attribute ids: type << 16 | name (MS-OXTNEF 2.1.3.3)
ATT_TNEF_VERSION = 0x0008_9006
ATT_OEM_CODEPAGE = 0x0006_9007
ATT_BODY = 0x0002_800C
ATT_ATTACH_REND_DATA = 0x0006_9002
ATT_ATTACH_TITLE = 0x0001_8010
ATT_ATTACH_DATA = 0x0006_800F
ATT_ATTACHMENT = 0x0006_9005  # the attachment's MAPI properties


def tnef_attribute(level: int, attribute: int, data: bytes) -> bytes:
    checksum = sum(data) % 65536
    return struct.pack("<BII", level, attribute, len(data)) + data + struct.pack("<H", checksum)


def tnef_stream(body: str, files: list[tuple[bytes, bytes]], extra: bytes = b"") -> bytes:
    """Signature, key, then message attributes, then each file's attributes."""
    out = [struct.pack("<IH", 0x223E9F78, 0x0001)]
    out.append(tnef_attribute(LEVEL_MESSAGE, ATT_TNEF_VERSION, struct.pack("<I", 0x10000)))
    out.append(tnef_attribute(LEVEL_MESSAGE, ATT_OEM_CODEPAGE, struct.pack("<II", 1252, 0)))
    out.append(tnef_attribute(LEVEL_MESSAGE, ATT_BODY, body.encode("cp1252") + b"\0"))
    for title, data in files:
        out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_REND_DATA, bytes(14)))
        out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_TITLE, title + b"\0"))
        out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_DATA, data))
    return b"".join(out) + extra


def outlook_mail(tnef: bytes, message_id: str = "outlook@acme.example") -> EmailMessage:
    """What Exchange sends when it keeps rich text: an empty body and winmail.dat."""
    mail = make_mail(body="", message_id=message_id)
    mail.add_attachment(tnef, maintype="application", subtype="ms-tnef", filename="winmail.dat")
    return mail


def test_winmail_dat_becomes_its_body_and_its_attachments(inst: Installation) -> None:
    pdf, png = b"%PDF-1.4 invoice", b"\x89PNG\r\n\x1a\n photo"
    tnef = tnef_stream(
        "The printer on floor 3 is jammed again. Caf\u00e9 area too.",
        [(b"..\\..\\invoice.pdf", pdf), (b"photo.png", png)],
    )
    result = inst.ingest(outlook_mail(tnef))
    assert result.outcome == "created"
    article = inbound_article(inst)
    assert "The printer on floor 3 is jammed again. Café area too." in article.text
    stored = {row.filename: inst.app.blobs.get(row.sha256) for row in article.attachments}
    assert stored == {"invoice.pdf": pdf, "photo.png": png}
    types = {row.filename: row.content_type for row in article.attachments}
    assert types == {"invoice.pdf": "application/pdf", "photo.png": "image/png"}


def test_a_relabelled_upper_case_winmail_dat_is_unpacked_too(inst: Installation) -> None:
    """Gateways turn application/ms-tnef into application/octet-stream, and some
    upper-case the name: Outlook's name alone still says what it is."""
    pdf = b"%PDF-1.4 invoice"
    mail = make_mail(body="", message_id="relabelled@acme.example")
    mail.add_attachment(tnef_stream("Jammed again.", [(b"invoice.pdf", pdf)]),
                        maintype="application", subtype="octet-stream",
                        filename="WINMAIL.DAT")  # fmt: skip
    assert inst.ingest(mail).outcome == "created"
    article = inbound_article(inst)
    assert "Jammed again." in article.text
    assert [(r.filename, inst.app.blobs.get(r.sha256)) for r in article.attachments] == [
        ("invoice.pdf", pdf)
    ]


ATT_MAPI_PROPS = 0x0006_9003  # the message's MAPI properties
PT_STRING, PT_BINARY, PT_OBJECT = 0x001E, 0x0102, 0x000D
PR_BODY_HTML, PR_ATTACH_LONG_FILENAME, PR_ATTACH_DATA_OBJ = 0x1013, 0x3707, 0x3701
IMESSAGE_IID = bytes.fromhex("0703020000000000c000000000000046")


def mapi_value(kind: int, name: int, data: bytes) -> bytes:
    """One variable-length property: type, id, one value, its length, padded to 4."""
    padded = data + bytes(-len(data) % 4)
    return struct.pack("<HHII", kind, name, 1, len(data)) + padded


def mapi_table(*properties: bytes) -> bytes:
    return struct.pack("<I", len(properties)) + b"".join(properties)


def rich_tnef_stream() -> bytes:
    """What newer Outlook writes: an HTML body and names in MAPI properties,
    one attachment with a long name, one an attached Outlook item."""
    html = b"<p onclick='x()'>Quarterly <b>report</b> attached.<script>alert(1)</script></p>"
    long_name = b"Quarterly report for the board, final version.xlsx\0"
    out = [tnef_stream("", [])]
    out.append(tnef_attribute(LEVEL_MESSAGE, ATT_MAPI_PROPS,
                              mapi_table(mapi_value(PT_BINARY, PR_BODY_HTML, html))))  # fmt: skip
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_REND_DATA, bytes(14)))
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_TITLE, b"QUARTE~1.XLS\0"))
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_DATA, b"PK\x03\x04 sheet"))
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACHMENT,
                              mapi_table(mapi_value(PT_STRING, PR_ATTACH_LONG_FILENAME,
                                                    long_name))))  # fmt: skip
    item = IMESSAGE_IID + tnef_stream("forwarded", [])
    assert len(item) % 4  # so that the value is padded, as Outlook's often are
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_REND_DATA, bytes(14)))
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_TITLE, b"Re: invoice\0"))
    item_table = mapi_table(mapi_value(PT_OBJECT, PR_ATTACH_DATA_OBJ, item))
    out.append(tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACHMENT, item_table))
    return b"".join(out)


def test_winmail_dat_with_mapi_properties_gives_html_long_names_and_items(
    inst: Installation,
) -> None:
    assert inst.ingest(outlook_mail(rich_tnef_stream())).outcome == "created"
    article = inbound_article(inst)
    assert "Quarterly <b>report</b> attached." in (article.html or "")
    assert "<script" not in article.html and "onclick" not in article.html
    assert "Quarterly report attached." in article.text  # derived from the HTML
    rows = {row.filename: row for row in article.attachments}
    assert set(rows) == {"Quarterly report for the board, final version.xlsx", "Re_ invoice.tnef"}
    sheet = rows["Quarterly report for the board, final version.xlsx"]
    assert inst.app.blobs.get(sheet.sha256) == b"PK\x03\x04 sheet"
    # the attached item is kept whole, never decoded in turn
    item = rows["Re_ invoice.tnef"]
    assert item.content_type == "application/vnd.ms-tnef"
    assert inst.app.blobs.get(item.sha256) == tnef_stream("forwarded", [])


def mapi_table_claiming(count: int) -> bytes:
    """An attachment property table whose count is far beyond its bytes."""
    return struct.pack("<I", count) + struct.pack("<HHI", 0x0003, 0x0E20, 7)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda s: s[:-7], id="truncated"),
        pytest.param(lambda s: b"\x00" + s[1:], id="bad-signature"),
        pytest.param(
            lambda s: (
                s
                + tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACHMENT, mapi_table_claiming(0xFFFFFFFF))
            ),
            id="mapi-count-4-billion",
        ),  # fmt: skip
    ],
)
def test_a_winmail_dat_that_cannot_be_read_stays_as_it_is(
    inst: Installation, damage: Callable[[bytes], bytes]
) -> None:
    tnef = damage(tnef_stream("Body", [(b"a.txt", b"a")]))
    started = time.monotonic()
    result = inst.ingest(outlook_mail(tnef))
    assert time.monotonic() - started < 2.0
    assert result.outcome == "created"
    rows = inbound_article(inst).attachments
    assert [(r.filename, inst.app.blobs.get(r.sha256)) for r in rows] == [("winmail.dat", tnef)]


# --- what the fuzzers found (test_fuzz.py): readable mail that was quarantined -------

BROKEN_WORD_TO = b"To: =?koi8-r?b?8tXT08vJygABc?= <support@example.com>"

FUZZ_FINDINGS = {
    # compat32's get_payload() decoded 8-bit bytes with the declared charset,
    # and the "idna" codec refuses the 'replace' error handler.
    "8-bit body labelled idna": head("idna@acme.example")
    + b"Content-Type: text/plain; charset=idna\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + b"Caf\xc3\xa9 printer is down.\r\n",
    # mail-parser let the stdlib's HeaderParseError on a broken base64 word escape.
    "broken base64 word in a To name": head("word@acme.example").replace(
        b"To: support@example.com", BROKEN_WORD_TO
    )
    + b"\r\nThe printer is down.\r\n",
}


@pytest.mark.parametrize("finding", FUZZ_FINDINGS)
def test_mail_the_fuzzers_found_quarantined_is_read(inst: Installation, finding: str) -> None:
    result = inst.ingest(FUZZ_FINDINGS[finding])
    assert result.outcome == "created", result.reason
    assert "printer is down" in inbound_article(inst).text
