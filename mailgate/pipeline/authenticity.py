"""Sender authenticity: does the From domain vouch for this mail?

From is free text, so an admin check on From alone lets anyone file tickets
as any admin. Two kinds of evidence, either suffices (RELIABILITY.md §3):

- a DKIM signature we verify ourselves (dkimpy) whose `d=` is aligned with the
  From domain: the same organisational domain (DMARC relaxed alignment), or
  the same domain when the From domain's DMARC record asks for `adkim=s`.
  A signature with `l=` does not count: a body length limit lets anyone
  append their own text under a valid signature (RFC 6376 §8.2);
- an Authentication-Results field (RFC 8601) written by an authserv-id the
  source trusts (the provider behind an IMAP mailbox, the MX in front of our
  SMTP listener) saying `dmarc=pass` for the From domain, or an aligned
  `dkim=pass`. Only fields at the top of the header block count, down to the
  first field of any other authserv-id: a hop we do not trust wrote that one,
  and anything below it could have been written by the sender.

Fields claiming our own authserv-id are forgeries (an MTA in front of us
has its own id) and are removed from the mail before it is stored. The
verdict is stored with the article: keys rotate, so the verdict at intake is
the one that counts later.

DNS is the only I/O, through `dnsfunc` (dkimpy's signature), so tests pass a
stub and no test needs the internet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import authres
import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

from mailgate.config import Authentication
from mailgate.pipeline.identify import Identity

DnsFunc = Callable[..., bytes | None]  # (name, timeout=…) -> TXT bytes or None

MAX_SIGNATURES = 5  # each costs a DNS query and a hash of the body
MIN_KEY_BITS = 1024

_BLANK_LINE = re.compile(rb"\r?\n(\r?\n)")
_FIELD_START = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


@dataclass(frozen=True)
class Verdict:
    authenticated: bool
    detail: str  # what decided, for the ingest reason and the stored header


# -- the header block, field by field -------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str  # lower-cased
    value: str  # unfolded
    start: int  # byte offsets of the whole field, continuation lines included
    end: int


def _fields(raw: bytes) -> Iterator[_Field]:
    match = _BLANK_LINE.search(raw)
    block_end = match.start(1) if match else len(raw)
    starts = list(_FIELD_START.finditer(raw, 0, block_end))
    ends = [following.start() for following in starts[1:]] + [block_end]
    # Not strict: a mail with no field at all (an empty pipe) has one end, no start.
    for here, end in zip(starts, ends, strict=False):
        value = raw[here.end() : end].decode("utf-8", "replace")
        name = here.group(1).decode("ascii").lower()
        yield _Field(name, re.sub(r"\r?\n[ \t]+", " ", value).strip(), here.start(), end)


def _authserv_id(value: str) -> str | None:
    try:
        header = authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # noqa: BLE001 - a field we cannot read is not evidence
        return None
    return str(header.authserv_id).lower() if header.authserv_id else None


def strip_forged_results(raw: bytes, our_id: str) -> bytes:
    """The mail without Authentication-Results fields claiming our authserv-id."""
    forged = [
        f
        for f in _fields(raw)
        if f.name == "authentication-results" and _authserv_id(f.value) == our_id.lower()
    ]
    for field in reversed(forged):
        raw = raw[: field.start] + raw[field.end :]
    return raw


# -- domains ---------------------------------------------------------------------


@cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # the list shipped with the package: no download


def _a_label(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def organisational_domain(domain: str) -> str:
    domain = _a_label(domain)
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(signing_domain: str, from_domain: str, *, strict: bool) -> bool:
    signing, author = _a_label(signing_domain), _a_label(from_domain)
    if strict:
        return signing == author
    return organisational_domain(signing) == organisational_domain(author)


# -- evidence --------------------------------------------------------------------


def trusted_results(
    fields: Sequence[str], trusted_ids: Sequence[str]
) -> list[authres.AuthenticationResultsHeader]:
    """The A-R fields (top first) we believe: the top run written by trusted authserv-ids."""
    trusted = {t.lower() for t in trusted_ids}
    believed = []
    for value in fields:
        try:
            header = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception:  # noqa: BLE001 - unreadable: written by someone we cannot trust
            break
        if str(header.authserv_id or "").lower() not in trusted:
            break
        believed.append(header)
    return believed


def _from_results(
    headers: Sequence[authres.AuthenticationResultsHeader], from_domain: str
) -> Verdict | None:
    for header in headers:
        for result in header.results:
            props = {f"{p.type}.{p.name}".lower(): str(p.value) for p in result.properties}
            method, outcome = str(result.method).lower(), str(result.result).lower()
            author = _a_label(props.get("header.from", ""))
            if method == "dmarc" and outcome == "pass" and author == _a_label(from_domain):
                return Verdict(True, f"dmarc=pass from {header.authserv_id}")
            if method == "dkim" and outcome == "pass":
                signer = props.get("header.d") or props.get("header.i", "").rpartition("@")[2]
                if signer and aligned(signer, from_domain, strict=False):
                    return Verdict(True, f"dkim=pass d={signer} from {header.authserv_id}")
    return None


def _dmarc_strict(from_domain: str, dnsfunc: DnsFunc, timeout: float) -> bool:
    """Does the From domain's DMARC record ask for strict DKIM alignment?"""
    for domain in dict.fromkeys((_a_label(from_domain), organisational_domain(from_domain))):
        try:
            record = dnsfunc(f"_dmarc.{domain}", timeout=timeout)
        except Exception:  # noqa: BLE001 - no record read: relaxed, the DMARC default
            return False
        if record:
            text = record.decode("ascii", "replace") if isinstance(record, bytes) else str(record)
            tags = dict(part.strip().split("=", 1) for part in text.split(";") if "=" in part)
            return tags.get("adkim", "r").strip().lower() == "s"
    return False


def _tags(value: str) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(value.encode("utf-8", "replace"))
    except InvalidTagValueList:
        return {}  # counted, so that the indexes stay dkimpy's


def _from_dkim(
    raw: bytes, fields: Sequence[str], from_domain: str, dnsfunc: DnsFunc, timeout: float
) -> Verdict:
    signatures = [_tags(value) for value in fields]
    if not signatures:
        return Verdict(False, "no DKIM signature")
    strict = _dmarc_strict(from_domain, dnsfunc, timeout)
    seen: list[str] = []
    for index, tags in enumerate(signatures[:MAX_SIGNATURES]):
        domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
        if b"l" in tags:
            seen.append(f"d={domain} has l= (body not covered)")
            continue
        if not domain or not aligned(domain, from_domain, strict=strict):
            seen.append(f"d={domain or '?'} not aligned with {from_domain}")
            continue
        try:
            verifier = dkim.DKIM(raw, minkey=MIN_KEY_BITS, timeout=timeout)
            valid = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except Exception as exc:  # noqa: BLE001 - dkimpy raises on malformed keys and tags
            seen.append(f"d={domain} {type(exc).__name__}")
            continue
        if valid:
            return Verdict(True, f"dkim=pass d={domain}")
        seen.append(f"d={domain} did not verify")
    return Verdict(False, "dkim: " + "; ".join(seen))


def verify_sender(
    raw: bytes,
    headers: Mapping[str, Sequence[str]],
    from_domain: str,
    trusted_ids: Sequence[str],
    *,
    dnsfunc: DnsFunc | None,
    timeout: float,
) -> Verdict:
    """Is the mail vouched for by its From domain? `headers`: the parsed mail's
    fields by lower-cased name, top first. Never raises."""
    results = trusted_results(headers.get("authentication-results", ()), trusted_ids)
    if trusted_ids and (found := _from_results(results, from_domain)):
        return found
    signatures = headers.get("dkim-signature", ())
    return _from_dkim(raw, signatures, from_domain, dnsfunc or dkim.dnsplug.get_txt, timeout)


def policy_for(settings: Authentication, identity: Identity) -> str:
    """require | prefer | off for this sender: staff have their own policy; a
    contact's organisation may override the default; strangers are not protected."""
    if identity.is_staff:
        return settings.staff_policy
    if identity.contact is not None:
        org = identity.contact.organisation_id or ""
        return settings.organisations.get(org, settings.policy)
    return "off"


def checks_anyone(settings: Authentication) -> bool:
    """Is any policy on? Else verification (and its DNS queries) is skipped."""
    policies = {settings.policy, settings.staff_policy, *settings.organisations.values()}
    return policies != {"off"}
