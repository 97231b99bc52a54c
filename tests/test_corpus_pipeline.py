"""Every real-world message in ../shared/corpus goes through the whole pipeline.

To make the screening checks bite, every sender found in the corpus is made an
authorised admin of an organisation with an active contract: a bounce, an
auto-reply or a report that slipped through screening would then open a
ticket and be answered, and the test would see it.
"""

from __future__ import annotations

import smtplib
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailgate.config import valid_address
from mailgate.pipeline.message import Envelope, ParseError
from mailgate.pipeline.parse import parse_message
from mailgate.pipeline.process import Result, process
from mailgate.store.models import OutboxMail, Ticket
from tests.conftest import NO_LOOP_LIMITS, Clockwork, Installation, install_at
from tests.corpus import CORPUS, corpus_files
from tests.smtp_sink import Sink

Row = tuple[str, str, str, int, int]  # file, outcome, reason, tickets made, mails queued
Told = tuple[str | None, ...]  # outcome, reason, ticket, matched_by
NEVER_TICKETS = ("bounces", "auto-replies", "reports")

pytestmark = pytest.mark.skipif(not corpus_files(), reason=f"corpus not present at {CORPUS}")


def corpus_senders(files: list[Path]) -> set[str]:
    senders = set()
    for path in files:
        try:
            msg = parse_message(path.read_bytes())
        except ParseError:
            continue
        if msg.sender and _directory_accepts(msg.sender):
            senders.add(msg.sender)
    return senders


def _directory_accepts(address: str) -> bool:
    # The directory refuses addresses no real admin has (guest@localhost);
    # mail from those is rejected, which the tests below also allow.
    try:
        valid_address(address)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory) -> tuple[dict[str, list[Row]], list[tuple[str, Told, Told]]]:
    """Ingest the whole corpus once, each mail explained first (a dry run);
    rows per folder, and where what `explain` said was not what ingest did."""
    files = corpus_files()
    senders = corpus_senders(files)
    directory = {
        "organisations": [
            {
                "id": "corpus",
                "name": "Corpus Org",
                "plan": "pro",
                "contract_until": "2099-12-31",
                "contacts": [{"email": s, "role": "admin"} for s in sorted(senders)],
            }
        ],
        "staff": [],
    }
    inst = install_at(tmp_path_factory.mktemp("corpus"), Clockwork(), directory=directory)
    results: dict[str, list[Row]] = defaultdict(list)
    disagreements = []
    for path in files:
        tickets_before, mails_before = _counts(inst)
        raw = path.read_bytes()
        told = process(inst.app, raw, Envelope(source="explain"), dry_run=True)
        result = inst.ingest(raw)  # raises if anything escapes the pipeline
        said, did = _told(told), _told(result)
        if said != did:
            disagreements.append((path.name, said, did))
        tickets_after, mails_after = _counts(inst)
        folder = path.relative_to(CORPUS).parts[0]
        results[folder].append(
            (
                path.name,
                result.outcome,
                result.reason,
                tickets_after - tickets_before,
                mails_after - mails_before,
            )
        )
    _print_table(results)
    return results, disagreements


def _told(result: Result) -> Told:
    return (result.outcome, result.reason, result.ticket, result.matched_by)


def _counts(inst: Installation) -> tuple[int, int]:
    with inst.session() as s:
        tickets = s.scalar(select(func.count()).select_from(Ticket)) or 0
        mails = s.scalar(select(func.count()).select_from(OutboxMail)) or 0
    return tickets, mails


def _print_table(results: dict[str, list[Row]]) -> None:
    outcomes = sorted({o for rows in results.values() for _, o, *_ in rows})
    print("\nfolder".ljust(18) + "".join(o[:11].rjust(12) for o in outcomes))
    total: Counter[str] = Counter()
    for folder, rows in sorted(results.items()):
        counts = Counter(o for _, o, *_ in rows)
        total.update(counts)
        print(folder.ljust(17) + "".join(str(counts[o]).rjust(12) for o in outcomes))
    print("total".ljust(17) + "".join(str(total[o]).rjust(12) for o in outcomes))


def test_every_message_reaches_exactly_one_outcome(corpus_run) -> None:
    allowed = {"created", "threaded", "rejected", "ignored", "bounce", "duplicate", "quarantined"}
    rows = [row for rows in corpus_run[0].values() for row in rows]
    assert len(rows) == len(corpus_files())
    assert {outcome for _, outcome, *_ in rows} <= allowed


@pytest.mark.parametrize("folder", NEVER_TICKETS)
def test_automated_mail_never_opens_a_ticket_or_gets_an_answer(corpus_run, folder: str) -> None:
    offenders = [
        (name, outcome)
        for name, outcome, _, tickets, mails in corpus_run[0][folder]
        if tickets or mails
    ]
    assert offenders == []


def test_explain_says_what_ingest_then_does(corpus_run) -> None:
    # Each mail explained against the state ingest then found: the operator's
    # dry run must be the decision, reason and ticket included.
    assert corpus_run[1] == []


def test_bounces_are_recognised(corpus_run) -> None:
    # Nothing we sent is returned here: a recognised bounce is an unmatched one,
    # kept in quarantine for an operator.
    wrong = [
        (name, outcome, reason)
        for name, outcome, reason, *_ in corpus_run[0]["bounces"]
        if outcome not in ("bounce", "quarantined", "ignored")
    ]
    assert wrong == []


def test_not_bounces_are_not_taken_for_bounces(corpus_run) -> None:
    wrong = [
        (n, o, r) for n, o, r, *_ in corpus_run[0]["not-bounces"] if o == "bounce" or "bounce" in r
    ]
    assert wrong == []


def test_every_message_is_taken_over_smtp(tmp_path: Path, sink: Sink) -> None:
    """Through the daemon's listener, with the CRLF line ends an MTA sends: a
    250 for each, whatever its lines (some are 24 KB long) or structure."""
    from tests.daemon import start_daemon

    daemon = start_daemon(tmp_path, sink, NO_LOOP_LIMITS)
    refused = []
    try:
        for path in corpus_files():
            raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            with daemon.smtp() as client:
                client.ehlo()
                client.mail("alice@acme.example")
                client.rcpt("support@example.com")
                try:
                    code, reply = client.data(raw)
                except smtplib.SMTPDataError as exc:
                    code, reply = exc.smtp_code, exc.smtp_error
            if code != 250:
                refused.append((path.name, code, reply[:80]))
    finally:
        daemon.stop()
    assert refused == []
    assert "Traceback" not in daemon.log()


def test_every_message_is_filed_from_an_imap_mailbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appended as they are to a Dovecot INBOX: each is fetched, decided and
    moved out, to the processed or the failed folder; none stays behind."""
    from tests.dovecot import start_dovecot
    from tests.test_imap import Running, eventually, held, settings_for

    server = start_dovecot(tmp_path / "dovecot")
    try:
        monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
        inst = install_at(tmp_path / "inst", Clockwork(), NO_LOOP_LIMITS)
        with server.session() as client:
            for path in corpus_files():
                client.append("INBOX", path.read_bytes())
        filed = ("mailgate/processed", "mailgate/failed")
        with Running(inst, settings_for(server, idle=False)):
            eventually(lambda: sum(held(server, f) for f in filed) == len(corpus_files()),
                       timeout=300, what="every corpus message filed")  # fmt: skip
        assert server.uids("INBOX") == []
        assert inst.ingest_records() == len(corpus_files())
    finally:
        server.stop()
