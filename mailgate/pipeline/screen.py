"""Screen: is this a person writing to us, or mail we must never answer?

Each check has a name, a one-line description and a test; the first that fires
decides, and its name and detail become the recorded reason. Checks that only
*suppress our acknowledgement* (the mail is still a person's) come last.

Markers anyone can forge (a loop header without our signature, X-Loop,
subject heuristics) never drop a person's mail: they only suppress acks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mailgate.pipeline.bounces import BounceInfo, classify_report, looks_like_ndr, verp_nonce
from mailgate.pipeline.message import Envelope, ParsedMessage
from mailgate.tickets.tokens import Signer

LOOP_HEADER = "X-Mailgate-Loop"


@dataclass(frozen=True)
class Screening:
    """outcome None: a person's mail, go on to identify. Otherwise final."""

    outcome: str | None  # None | ignored | bounce | quarantined
    reason: str
    suppress_ack: bool = False
    # Its subject is an autoresponder's ("Automatic reply: …"): whoever sent it,
    # it answers nobody (a staff member's is not relayed to the customer).
    autoreply: bool = False
    bounce: BounceInfo | None = None
    # Did the sender's domain vouch for this mail (DKIM/DMARC)? None: not
    # checked (policy off). False refuses staff /commands.
    sender_authenticated: bool | None = None
    authentication: str | None = None  # the verdict's detail, stored with the article


@dataclass(frozen=True)
class ScreenContext:
    signer: Signer
    support_address: str
    envelope: Envelope


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    test: Callable[[ParsedMessage, ScreenContext], str | None]  # detail when it fires


# -- helpers -----------------------------------------------------------------

_ROBOT_LOCALS = re.compile(
    r"^(mailer-daemon|post_?master|listserv|majordomo|owner-.+|.+-request|.+-owner|"
    r"no-?reply|do-?not-?reply|bounces?(\+.*)?|"
    r"microsoftexchange[0-9a-f]{32})$"  # Exchange's system mailbox: its notices, never a person
)
# Outlook writes its automatic replies' subjects in the reader's language. The
# words alone or before a colon, dash or bracket: "Absence requests fail since
# the update" is a person's subject (an HR platform's admin), and got no ack.
_AUTOREPLY_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response)|out of (the )?office( auto-?reply)?|abwesenheit\w*|"
    r"r[ée]ponse automatique|absen(ce|t)( du bureau)?|respuesta autom[aá]tica|"
    r"fuera de la oficina|auto|"
    r"automatische antwort|automatisch antwoord|risposta automatica|resposta autom[aá]tica|"
    r"automatiskt? svar|autosvar|automatyczna odpowied[zź]|automaattinen vastaus)"
    r"\s*([:\-\u2013\u2014(\[]|$)",
    re.IGNORECASE,
)


# A plain-text read receipt: both its subject and its wording (en, fr, es, de).
_RECEIPT_SUBJECT = re.compile(
    r"^\s*(not read|read|non lu|lu|no le[ií]do|le[ií]do|ungelesen|gelesen)\s*:", re.IGNORECASE
)
_RECEIPT_TEXT = re.compile(
    r"^\s*(was (read|deleted without being read) on|a été (lu|supprimé sans avoir été lu) le|"
    r"(ha sido|fue) le[ií]do el|se (ha )?eliminado sin (haberse )?le[ií]do|wurde am .{1,80}"
    r"(gelesen|ungelesen gelöscht))",
    re.IGNORECASE | re.MULTILINE,
)


def _robot_sender(msg: ParsedMessage) -> str | None:
    for address in msg.from_addresses:
        local = address.partition("@")[0]
        if _ROBOT_LOCALS.match(local):
            return address
    return None


def _null_return_path(msg: ParsedMessage, ctx: ScreenContext) -> bool:
    if ctx.envelope.mail_from == "":
        return True
    return any(v.strip() in ("<>", "") for v in msg.headers.get("return-path", ()))


def _is_our_address(ctx: ScreenContext, address: str) -> bool:
    local, _, domain = ctx.support_address.partition("@")
    a_local, _, a_domain = address.partition("@")
    return a_domain == domain and (a_local == local or a_local.startswith(local + "+"))


# -- the checks, in order ----------------------------------------------------


def _delivery_report(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    return "delivery-status report" if msg.report_type == "delivery-status" else None


def _other_report(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    kinds = {"disposition-notification": "read receipt", "feedback-report": "abuse report"}
    if kind := kinds.get(msg.report_type or ""):
        return kind
    # Outlook's receipts to some servers are plain text, no report: threaded,
    # one would be the customer's answer (staff told, the SLA clock stopped).
    if _RECEIPT_SUBJECT.match(msg.subject) and _RECEIPT_TEXT.search(msg.text[:2000]):
        return "read receipt (plain text)"
    return None


def _ndr(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    return looks_like_ndr(msg, null_sender=_null_return_path(msg, ctx))


def _our_message_id(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    if ctx.signer.is_ours(msg.message_id):
        return f"Message-ID {msg.message_id} is one we generated"
    return None


def _our_loop_marker(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    for marker in msg.headers.get(LOOP_HEADER.lower(), ()):
        if ctx.signer.verify_loop_marker(marker, msg.message_id):
            return f"{LOOP_HEADER}: {marker.split(';')[0]}"
    return None


def _from_ourselves(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    for address in msg.from_addresses:
        if _is_our_address(ctx, address):
            return f"From {address} is our own address"
    return None


def _auto_submitted(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    for value in msg.headers.get("auto-submitted", ()):
        if value.split(";")[0].strip().lower() != "no":
            return f"Auto-Submitted: {value[:40]}"
    return None


def _precedence(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    for value in msg.headers.get("precedence", ()):
        if value.strip().lower() in ("bulk", "junk", "list", "auto_reply"):
            return f"Precedence: {value.strip()[:20]}"
    return None


def _list_headers(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    for name in msg.headers:
        if name.startswith("list-") or name in ("mailing-list", "x-mailing-list"):
            return f"mailing-list header {name}"
    return None


def _autoreply_headers(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    for name in ("x-autoreply", "x-autorespond", "x-autogenerated", "x-auto-response"):
        if name in msg.headers:
            return f"header {name}"
    # iCloud's vacation replies carry no standard header, only this one.
    if any(v.strip().lower() == "vacation" for v in msg.headers.get("x-apple-action", ())):
        return "X-Apple-Action: VACATION"
    if any(v.strip().lower() in ("yes", "true") for v in msg.headers.get("x-loop", ())):
        return "X-Loop: yes"
    return None


def _null_sender(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    return "null return path <>" if _null_return_path(msg, ctx) else None


def _robot(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    address = _robot_sender(msg)
    return f"automated sender {address}" if address else None


def _to_bounce_address(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    # Only our envelope sender carries this signed address, and people answer
    # From or Reply-To: what comes here and is no bounce is an autoresponder
    # answering the envelope sender (RFC 3834 §4) that marked nothing. Answered,
    # it would answer again; held, an operator still sees an odd bounce.
    if verp_nonce(ctx.signer, ctx.support_address, ctx.envelope, msg):
        return "sent to our bounce address, but no delivery report: an autoresponder's answer"
    return None


def _ambiguous_sender(msg: ParsedMessage, ctx: ScreenContext) -> str | None:
    if len(msg.from_addresses) > 1:
        return f"ambiguous sender: {len(msg.from_addresses)} addresses in From"
    if not msg.from_addresses:
        return "ambiguous sender: no address in From"
    return None


# The mail is automated or ours: record it, never answer it.
FINAL_CHECKS: tuple[tuple[str, Check], ...] = (
    ("bounce", Check("dsn", "an RFC 3464 delivery-status report", _delivery_report)),
    ("ignored", Check("report", "a read receipt (MDN) or an abuse report (ARF)", _other_report)),
    ("bounce", Check("ndr", "a non-standard delivery failure notice", _ndr)),
    ("ignored", Check("own-message-id", "our own mail looping back", _our_message_id)),
    ("ignored", Check("own-loop-marker", "our signed loop marker", _our_loop_marker)),
    ("ignored", Check("own-address", "mail from our own address", _from_ourselves)),
    ("ignored", Check("auto-submitted", "RFC 3834 automatic mail", _auto_submitted)),
    ("ignored", Check("precedence", "bulk, junk or list mail", _precedence)),
    ("ignored", Check("list", "mailing-list mail (RFC 2369/2919)", _list_headers)),
    ("ignored", Check("autoreply-header", "an autoresponder's header", _autoreply_headers)),
    ("ignored", Check("null-sender", "empty return path", _null_sender)),
    ("ignored", Check("robot-sender", "mailer-daemon, postmaster, list robots", _robot)),
    ("quarantined", Check("bounce-address", "mail to our VERP address", _to_bounce_address)),
    ("quarantined", Check("ambiguous-sender", "From names no single address", _ambiguous_sender)),
)


def _suppress_header(msg: ParsedMessage) -> str | None:
    for value in msg.headers.get("x-auto-response-suppress", ()):
        tokens = {t.strip().lower() for t in value.split(",")}
        if tokens & {"all", "oof", "autoreply"}:
            return f"X-Auto-Response-Suppress: {value[:40]}"
    return None


def looks_like_autoreply(subject: str) -> bool:
    """Does the subject start the way autoresponders write theirs?"""
    return _AUTOREPLY_SUBJECT.match(subject) is not None


def _ack_suppression(msg: ParsedMessage) -> str | None:
    """A person's mail we handle, but must not acknowledge."""
    if detail := _suppress_header(msg):
        return detail
    if msg.headers.get(LOOP_HEADER.lower()):
        return f"unsigned {LOOP_HEADER} header"
    if looks_like_autoreply(msg.subject):
        return "subject looks like an automatic reply"
    return None


def screen(msg: ParsedMessage, ctx: ScreenContext) -> Screening:
    for outcome, check in FINAL_CHECKS:
        detail = check.test(msg, ctx)
        if detail:
            bounce = classify_report(msg, ctx.signer, ctx.support_address, ctx.envelope)
            return Screening(
                outcome, f"{check.name}: {detail}", bounce=bounce if outcome == "bounce" else None
            )
    suppressed = _ack_suppression(msg)
    if suppressed:
        return Screening(None, f"no acknowledgement: {suppressed}", suppress_ack=True,
                         autoreply=looks_like_autoreply(msg.subject))  # fmt: skip
    return Screening(None, "a person's mail")
