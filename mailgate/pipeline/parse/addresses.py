"""Addresses from address headers, structurally: an RFC 2047 word or a display
name never becomes an address (CVE-2023-27043), and anything read in more than
one way yields no sender at all."""

from __future__ import annotations

import email.utils
import re
from email.errors import HeaderParseError

from mailgate.pipeline.message import ParseError
from mailgate.pipeline.parse.headers import decode_header_value
from mailgate.pipeline.parse.limits import Limits
from mailgate.pipeline.sanitize import clean_header_text, replace_controls

try:  # mail-parser >= 4.8: structural scanner with ambiguity diagnostics
    from mailparser.utils import get_addresses as _mailparser_addresses

    _mailparser_addresses("a@b.example", defects=[], decode_names=True)
except (ImportError, TypeError):  # pragma: no cover - older mail-parser
    _mailparser_addresses = None

_MAX_NAME_CHARS = 256  # a display name longer than this is junk

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN_LITERAL = re.compile(r"\[[^\[\]\\\s]{1,253}\]")


def normalise_address(address: str) -> str | None:
    """``local@domain`` lower-cased, IDN domain as A-labels; None if not an address.

    Exposed so the directory can store addresses the way they are compared.
    """
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 320:
        return None
    if replace_controls(address) != address:
        return None
    if not local.startswith('"') and any(ch.isspace() for ch in address):
        return None
    domain = domain.rstrip(".").lower()
    if _DOMAIN_LITERAL.fullmatch(domain):
        return f"{local.lower()}@{domain}"
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not _HOSTNAME.fullmatch(domain) or len(domain) > 253:
        return None
    return f"{local.lower()}@{domain}"


def _scan_addresses(value: str) -> tuple[list[tuple[str, str]], bool]:
    """(name, address) pairs and whether any item was unreadable or ambiguous."""
    if _mailparser_addresses is not None:
        diagnostics: list[dict] = []
        try:
            pairs = _mailparser_addresses(value, defects=diagnostics, decode_names=True)
        except HeaderParseError:
            # mail-parser 4.8 lets the stdlib's error on a broken base64 word in
            # a display name escape. Read the structure again with the names
            # left as they are (the addresses never depended on them), and
            # decode the names with our own tolerant decoder.
            diagnostics = []
            pairs = _mailparser_addresses(value, defects=diagnostics, decode_names=False)
            pairs = [(decode_header_value(name), address) for name, address in pairs]
        unclear = any(not d.get("recovered") for d in diagnostics)
        for diagnostic in diagnostics:
            if not diagnostic.get("recovered"):
                # Surface what a lenient reader could have seen, so that the
                # sender is never one arbitrary pick among several.
                pairs.extend(("", c.get("address", "")) for c in diagnostic.get("candidates", ()))
        return [(n, a) for n, a in pairs if a], unclear
    return _stdlib_scan_addresses(value)  # pragma: no cover - older mail-parser


def _stdlib_scan_addresses(value: str) -> tuple[list[tuple[str, str]], bool]:
    # Without mail-parser's scanner: stdlib parse, and distrust anything an
    # attacker could use to make parsers disagree.
    risky = "=?" in value or value.count('"') % 2 or value.count("<") != value.count(">")
    pairs = [(n, a) for n, a in email.utils.getaddresses([value]) if a]
    if len(pairs) != value.count("@") - sum(n.count("@") for n, _ in pairs):
        risky = True
    return pairs, bool(risky)


def _check_address_count(name: str, value: str, limits: Limits) -> None:
    if value.count("@") > limits.max_addresses:
        raise ParseError(
            f"{name} header lists more addresses than the {limits.max_addresses}-address limit"
        )


def read_from(values: list[str], limits: Limits, defects: list[str]) -> tuple[tuple[str, ...], str]:
    """Every addr-spec in every From header; ambiguity yields several or none."""
    addresses: list[str] = []
    names: list[str] = []
    unclear = False
    for value in values:
        _check_address_count("From", value, limits)
        pairs, item_unclear = _scan_addresses(value)
        unclear = unclear or item_unclear
        for name, address in pairs:
            normalised = normalise_address(address)
            if normalised is None:
                unclear = True
                continue
            addresses.append(normalised)
            names.append(name)
    unique = tuple(dict.fromkeys(addresses))
    if unclear:
        defects.append("From header is ambiguous or unreadable")
        if len(unique) == 1:
            # One address read from a header that also held something we could
            # not read: another reader may see a different sender.
            return (), ""
    if len(addresses) > 1 and len(unique) == 1:
        # "a@x, a@x" or the same From twice: still not one clear mailbox.
        unique = tuple(addresses)
    from_name = clean_header_text(names[0], _MAX_NAME_CHARS) if names else ""
    return unique, from_name


def read_addresses(
    values: list[str], header: str, limits: Limits, defects: list[str]
) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        _check_address_count(header, value, limits)
        pairs, unclear = _scan_addresses(value)
        if unclear:
            defects.append(f"{header} header is ambiguous or unreadable")
        for _name, address in pairs:
            normalised = normalise_address(address)
            if normalised is not None:
                found.append(normalised)
    return tuple(dict.fromkeys(found))
