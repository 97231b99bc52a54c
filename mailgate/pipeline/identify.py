"""Identify: who wrote this mail, and may they open tickets?

Matching is on the address only (case-insensitive), never the display name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True)
class Person:
    """What the directory says about one address, as plain data."""

    address: str
    kind: str  # staff | contact
    id: int
    name: str
    active: bool
    role: str | None = None  # contacts: admin | member
    organisation_id: str | None = None
    organisation_active: bool = True
    contract_from: date | None = None
    contract_until: date | None = None
    language: str = "en"


@dataclass(frozen=True)
class Identity:
    address: str
    person: Person | None
    may_open: bool
    refusal: str | None  # why this sender may not open a ticket

    @property
    def is_staff(self) -> bool:
        return self.person is not None and self.person.kind == "staff" and self.person.active

    @property
    def contact(self) -> Person | None:
        p = self.person
        return p if p is not None and p.kind == "contact" and p.active else None


def contract_active(person: Person, on: date) -> bool:
    if not person.organisation_active:
        return False
    if person.contract_from and on < person.contract_from:
        return False
    return not (person.contract_until and on > person.contract_until)


def identify(address: str, person: Person | None, on: date) -> Identity:
    """Decide from the directory entry whether `address` may open a ticket on `on`."""
    if person is None:
        return Identity(address, None, False, "sender not in the directory")
    if not person.active:
        return Identity(address, person, False, f"{person.kind} {address} is inactive")
    if person.kind == "staff":
        return Identity(address, person, False, "staff mail that answers no ticket")
    if not contract_active(person, on):
        return Identity(
            address, person, False, f"organisation {person.organisation_id} has no active contract"
        )
    if person.role != "admin":
        return Identity(address, person, False, "sender is not an authorised admin")
    return Identity(address, person, True, None)


def describe(identity: Identity) -> str:
    """One line for `explain` and the JSON output: who the sender is, and why not if refused."""
    person = identity.person
    if person is None:
        who = f"{identity.address}: unknown"
    elif person.kind == "staff":
        # Staff answer tickets and never open one: whether this mail answers one
        # is the outcome's business (the refusal would be wrong for an answer).
        return f"{identity.address}: staff" + ("" if person.active else " (inactive)")
    else:
        inactive = "" if person.active else " (inactive)"
        who = f"{identity.address}: {person.role} of {person.organisation_id}{inactive}"
    return who if identity.may_open else f"{who}; may not open tickets: {identity.refusal}"
