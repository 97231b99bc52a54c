"""Per-ticket pseudonyms: people's addresses and names replaced in stored text.

Pure functions: the callers (retention.py, gdpr.py) decide whose data goes
and write the result. A `Pseudonyms` lives for one ticket and is thrown away
afterwards, so nothing links `person-1@anonymised.invalid` of one ticket to
the same person on another: with the mapping gone the data is anonymous, not
merely pseudonymous (GDPR Recital 26).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PSEUDONYM_DOMAIN = "anonymised.invalid"  # RFC 2606: never a real domain
# Loose on purpose: anything shaped like an address in free text is replaced.
# Without "=", which RFC 5322 allows in a local part but logs use between a key
# and its value ("sender=alice@…"); an SRS address keeps its prefix, not its person.
# An address starts where a run of local-part characters starts (the look-behind)
# and nothing is given back (possessive): a search through a long run without an
# "@" is then linear, not quadratic (a 1 MB body took the retention run an hour).
_LOCAL = r"[\w.!#$%&'*+/?^`{|}~-]"
ADDRESS = re.compile(rf"(?<!{_LOCAL}){_LOCAL}++@[\w-]++(?:\.[\w-]++)+", re.UNICODE)
MIN_NAME_PART = 3  # "Al" or "Li" alone would replace parts of ordinary words


@dataclass
class Pseudonyms:
    """Whose data goes: the addresses given to `forget` (or, `forget_everyone`,
    every address), and the names given with them. `keep`: addresses that stay
    (staff's: employees, needed for time and credit reports); `keep_domain`:
    ours (the support address, our own Message-IDs)."""

    keep: frozenset[str] = frozenset()
    keep_domain: str = ""
    forget_everyone: bool = True  # False: only the addresses given to `forget`
    # One phrase for everyone instead of numbered pseudonyms (an export's "someone else").
    anonymous: str | None = None
    _addresses: dict[str, str] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)

    def forget(self, address: str | None, name: str | None = None) -> None:
        if not address:
            return
        pseudonym = self.address(address)
        if name and name.strip():
            self._names.setdefault(name.strip(), self._name_for(pseudonym))

    def address(self, address: str) -> str:
        key = address.strip().lower()
        if self._kept(key):
            return address
        found = self._addresses.get(key)
        if found is None:
            found = self.anonymous or f"person-{len(self._addresses) + 1}@{PSEUDONYM_DOMAIN}"
            self._addresses[key] = found
        return found

    def applies_to(self, address: str | None) -> bool:
        if not address:
            return False
        key = address.strip().lower()
        return not self._kept(key) and (self.forget_everyone or key in self._addresses)

    def _kept(self, key: str) -> bool:
        return key in self.keep or bool(self.keep_domain) and key.endswith("@" + self.keep_domain)

    def text(self, value: str | None) -> str | None:
        """Addresses and known names replaced in free text."""
        if not value:
            return value
        value = ADDRESS.sub(self._replace_address, value)
        for name, pseudonym in self._name_patterns():
            value = name.sub(pseudonym, value)
        return value

    def name(self, value: str | None) -> str:
        return self.text(value) or ""

    def _replace_address(self, match: re.Match[str]) -> str:
        found = match.group(0)
        return self.address(found) if self.applies_to(found) else found

    def _name_for(self, pseudonym: str) -> str:
        return self.anonymous or "Person " + pseudonym.split("@")[0].removeprefix("person-")

    def _name_patterns(self) -> list[tuple[re.Pattern[str], str]]:
        """The full names first, then each part long enough to be a name on its own."""
        patterns: list[tuple[str, str]] = []
        for name, pseudonym in self._names.items():
            patterns.append((name, pseudonym))
            patterns += [(part, pseudonym) for part in name.split() if len(part) >= MIN_NAME_PART]
        patterns.sort(key=lambda p: -len(p[0]))
        # Any case ("alice-invoice.pdf" names her too); whole words only.
        return [(re.compile(rf"(?<!\w){re.escape(n)}(?!\w)", re.IGNORECASE), p)
                for n, p in patterns]  # fmt: skip
