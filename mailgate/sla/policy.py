"""Which SLA targets apply to a ticket, measured in which business calendar.

Settings name the calendars and give targets per plan and priority, with
per-organisation overrides; a calendar without its own time zone or country
takes the organisation's. Built once per settings (App.sla) and cached per
calendar and organisation, so computing a deadline costs no YAML and no
holiday table rebuild.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from zoneinfo import ZoneInfo

from mailgate.config import Sla, SlaCalendar, span_parts
from mailgate.sla.calendar import Calendar, holiday_checker, parse_hours

log = logging.getLogger("mailgate.sla")

KINDS = ("first_response", "workaround", "resolution")
BREACH = 1.0  # the last threshold: the target itself


@dataclass(frozen=True)
class Target:
    kind: str  # first_response | workaround | resolution
    span: timedelta  # business time allowed
    calendar_name: str
    calendar: Calendar


@dataclass(frozen=True)
class Where:
    """What a calendar borrows from the ticket's organisation."""

    timezone: str
    country: str | None


class SlaPolicy:
    def __init__(self, settings: Sla) -> None:
        self.settings = settings
        self.thresholds = (*settings.reminders, BREACH)
        self._calendar = cache(self._build_calendar)

    def targets(self, org_id: str, plan: str, priority: str, where: Where) -> list[Target]:
        """The targets of a ticket, in KINDS order; none when the SLA is switched off."""
        sla = self.settings
        if not sla.enabled:
            return []
        base = sla.plans.get(plan) or sla.plans[sla.default_plan]
        entry = getattr(base, priority)
        override = sla.organisations.get(org_id)
        part = getattr(override, priority) if override else None
        targets = []
        for kind in KINDS:
            plan_target = getattr(entry, kind)
            own_target = getattr(part, kind) if part else None
            target = own_target or plan_target
            # The most specific level names the calendar: target, priority,
            # plan; at one level an organisation's override wins over its
            # plan. So an organisation with its own business hours keeps
            # enterprise P1's first response on the 24/7 calendar its plan
            # gives that one target.
            calendar = next(
                name
                for name in (
                    own_target and own_target.calendar,
                    plan_target and plan_target.calendar,
                    part and part.calendar,
                    entry.calendar,
                    override and override.calendar,
                    base.calendar,
                )
                if name
            )
            if target is not None:
                cal = self.calendar(calendar, where)
                targets.append(Target(kind, self.span(target.within, cal), calendar, cal))
        return targets

    def calendar(self, name: str, where: Where) -> Calendar:
        return self._calendar(name, where)

    @staticmethod
    def span(value: str, calendar: Calendar) -> timedelta:
        days, minutes = span_parts(value)
        return days * calendar.day_length() + timedelta(minutes=minutes)

    def _build_calendar(self, name: str, where: Where) -> Calendar:
        spec: SlaCalendar = self.settings.calendars[name]
        zone = ZoneInfo(spec.timezone or where.timezone)
        country = (spec.country or where.country) if spec.holidays else None
        try:
            holidays = holiday_checker(country, spec.subdivision, spec.dates)
        except ValueError as exc:
            # A country the holidays package does not know must not stop intake:
            # the listed dates still apply, and `mailgate check` names the problem.
            log.warning("calendar %s: %s; public holidays ignored", name, exc)
            holidays = holiday_checker(None, None, spec.dates)
        return Calendar(zone, parse_hours(spec.hours), holidays)
