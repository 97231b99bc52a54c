"""Signed keys we put on outbound mail so that replies find their ticket.

Nobody without the secret can forge one: a Message-ID or plus-address that
claims a ticket but fails the HMAC is treated as if it were absent.

    Message-ID   mg.<ticket>.<nonce>.<sig>@<domain>   (ticket 0: no ticket)
    Reply-To     <local>+t<ticket>-<sig>@<domain>
    VERP sender  <local>+b<nonce>-<sig>@<domain>       (bounces find their mail)
    loop marker  <instance>; <sig over the Message-ID>

Signatures are lower-case hex because some MTAs lower-case local parts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

SIG_LEN = 16


@dataclass(frozen=True)
class Signer:
    secret: bytes

    def sign(self, purpose: str, value: str, length: int = SIG_LEN) -> str:
        mac = hmac.new(self.secret, f"{purpose}:{value}".encode(), hashlib.sha256)
        return mac.hexdigest()[:length]

    def verify(self, purpose: str, value: str, sig: str, length: int = SIG_LEN) -> bool:
        # Bytes: compare_digest raises TypeError on a non-ASCII str, and `sig`
        # comes from a stranger's header.
        expected = self.sign(purpose, value, length).encode()
        return hmac.compare_digest(expected, sig.lower().encode("utf-8", "replace"))

    # Message-IDs -----------------------------------------------------------

    def message_id(self, ticket_id: int | None, domain: str, nonce: str | None = None) -> str:
        nonce = nonce or new_nonce()
        ticket = ticket_id or 0
        sig = self.sign("mid", f"{ticket}.{nonce}")
        return f"mg.{ticket}.{nonce}.{sig}@{domain}"

    def ticket_from_message_id(self, message_id: str) -> int | None:
        """The ticket id a genuine mailgate Message-ID carries (0 for none), else None."""
        match = _MID.match(message_id)
        if not match:
            return None
        ticket, nonce, sig = match.groups()
        # Ours are lower case; a gateway that upper-cases the ids a mail answers
        # must not make our own Message-ID a stranger's.
        if not self.verify("mid", f"{ticket}.{nonce.lower()}", sig):
            return None
        return int(ticket)

    def is_ours(self, message_id: str | None) -> bool:
        return bool(message_id) and self.ticket_from_message_id(message_id) is not None

    # Plus-addresses ----------------------------------------------------------

    def reply_address(self, support_address: str, ticket_id: int) -> str:
        local, domain = support_address.split("@", 1)
        return f"{local}+t{ticket_id}-{self.sign('reply', str(ticket_id))}@{domain}"

    def verp_address(self, support_address: str, nonce: str) -> str:
        local, domain = support_address.split("@", 1)
        return f"{local}+b{nonce}-{self.sign('verp', nonce)}@{domain}"

    def parse_plus_address(self, support_address: str, address: str) -> tuple[str, str] | None:
        """('ticket', id) or ('bounce', nonce) for a genuine tagged address of ours."""
        local, domain = support_address.lower().split("@", 1)
        addr_local, _, addr_domain = address.lower().partition("@")
        if addr_domain != domain or not addr_local.startswith(local + "+"):
            return None
        tag = addr_local[len(local) + 1 :]
        if m := re.fullmatch(r"t(\d{1,18})-([0-9a-f]+)", tag):
            if self.verify("reply", m.group(1), m.group(2)):
                return ("ticket", m.group(1))
        elif (m := re.fullmatch(r"b([0-9a-z]{8,32})-([0-9a-f]+)", tag)) and self.verify(
            "verp", m.group(1), m.group(2)
        ):
            return ("bounce", m.group(1))
        return None

    # Loop marker -------------------------------------------------------------

    def loop_marker(self, instance_id: str, message_id: str) -> str:
        return f"{instance_id}; {self.sign('loop', message_id)}"

    def verify_loop_marker(self, marker: str, message_id: str | None) -> bool:
        _, _, sig = marker.partition(";")
        return bool(message_id) and self.verify("loop", message_id, sig.strip())


_MID = re.compile(r"^mg\.(\d{1,18})\.([0-9a-z]{8,32})\.([0-9a-f]{16})@", re.IGNORECASE)


def new_nonce() -> str:
    return secrets.token_hex(8)


def load_or_create_secret(path: Path) -> bytes:
    """The HMAC key; created (0600) on first use so a fresh install just works."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    # O_EXCL: two processes starting at once must agree on one key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return bytes.fromhex(key)
