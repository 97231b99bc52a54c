"""The shipped templates and TemplateSet: every kind in every language, escaping, fallback."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgate.outbound.templates import (
    CONTEXT_KEYS,
    KINDS,
    REJECTION_REASONS,
    TemplateRenderError,
    TemplateSet,
    excerpt,
    sample_context,
)
from tests.conftest import Installation, make_mail

SHIPPED = Path(__file__).resolve().parents[1] / "templates"
LANGUAGES = ("en", "fr", "es")


@pytest.fixture(scope="module")
def shipped() -> TemplateSet:
    return TemplateSet(SHIPPED)


def context(kind: str, **overrides: object) -> dict[str, object]:
    values = {
        "ticket": {
            "number": "SUP-2026-000042",
            "subject": "Échec <script>alert('x')</script> – ñandú 日本",
            "priority": "P1",
            "status": "waiting_customer",
            "org_name": "Société & Fils",
            "level": "L2",
        },
        "requester_name": "José Müller",
        "staff_name": "Zoé Dupré",
        "text": "Première ligne\n<script>alert('x')</script>\nÿ ñ ç",
        "attachments": [{"name": "<img src=x onerror=alert(1)>.png", "size": 2048}],
        "reason": "not_admin",
        "failed_mail": {
            "id": 3,
            "kind": "staff_reply",
            "to": ["josé@example.com"],
            "subject": "Re: Échec <script>alert('x')</script>",
            "message_id": "<mg.1.abc@example.com>",
            "attempts": 2,
            "reason": "RCPT TO: 550 5.1.1 <script>alert('x')</script>",
        },
        "reopen_days": 14,
        "auto_resolved": False,
        "resolve_after_days": 4,
        "problems": [
            {
                "line": 1,
                "text": "/statuss <script>alert('x')</script>",
                "reason": "unknown command",
            },
            {"line": 3, "text": "/spend <b>lots</b> & more", "reason": "/spend: not a duration"},
        ],
        "targets": [
            {"kind": "first_response", "due": "Monday 24 November at 11:00"},
            {"kind": "resolution", "due": "Friday 28 November at 17:00"},
        ],
        "clock": {
            "kind": "first_response",
            "percent": 80,
            "due": "Tuesday 24 November at 11:00 (Europe/Brussels)",
            "target_minutes": 90,
        },
        "person_name": "José <b>Müller</b>",
        "alert": {
            "about": "subject 'Re: <script>alert('x')</script>'",
            "reason": "circuit breaker: 10 tickets with this subject in the last hour",
        },
        "credit": {"balance": 12, "expires": "23 November 2027", "flagged": False},
        "org_name": "Société & Fils <script>alert('x')</script>",
        "balance": 3,
        "threshold": 8,
        "expires": "23 November 2027",
        "credits": 5,
        "rollover": True,
        "support_address": "support@example.com",
        "language": "xx",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if k in CONTEXT_KEYS[kind]}


def test_shipped_templates_pass_check(shipped: TemplateSet) -> None:
    assert shipped.check() == []
    assert shipped.kinds() == sorted(KINDS)
    assert set(LANGUAGES) <= set(shipped.languages())


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_in_every_language(
    shipped: TemplateSet, kind: str, language: str
) -> None:
    rendered = shipped.render(kind, language, context(kind))
    assert rendered.subject and "\n" not in rendered.subject
    assert rendered.text.strip() and rendered.html.strip()
    assert f'<html lang="{language}">' in rendered.html  # `language` is the one rendered
    if "ticket" in CONTEXT_KEYS[kind]:
        assert "[SUP-2026-000042]" in rendered.subject  # replies thread on the tag
        assert "SUP-2026-000042" in rendered.text
    # Markup from the customer is text in the text part and escaped in the HTML part.
    raw, escaped = "<script>alert('x')</script>", "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert "<script" not in rendered.html and "<img" not in rendered.html
    if kind not in ("rejection", "spoof_notice"):  # these repeat nothing a stranger wrote
        assert escaped in rendered.html
        assert raw in rendered.text or raw in rendered.subject
    for name in ("José Müller", "Zoé Dupré", "Société & Fils"):
        if name in rendered.text:
            assert name.replace("&", "&amp;") in rendered.html


GREETING = {"en": "Hello {},", "fr": "Bonjour {},", "es": "Hola, {}:"}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith(("staff_", "sla_", "op"))])
def test_every_customer_mail_greets_the_person_alike(
    shipped: TemplateSet, kind: str, language: str
) -> None:
    # The Spanish spoofing notice read "Hola José:" where every other mail says
    # "Hola, José:" (the vocative comma).
    name = "José Müller"
    rendered = shipped.render(kind, language, context(kind, requester_name=name, person_name=name))
    assert rendered.text.split("\n")[0] == GREETING[language].format(name), kind
    assert f"<p>{GREETING[language].format(name)}</p>" in rendered.html, kind


@pytest.mark.parametrize("language", LANGUAGES)
def test_ack_content(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("ack", language, context("ack"))
    subject = context("ack")["ticket"]["subject"]  # type: ignore[index]
    assert rendered.subject == f"[SUP-2026-000042] Re: {subject}"
    assert "José Müller" in rendered.text
    assert "P1" in rendered.text
    assert "support@example.com" in rendered.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_staff_reply_is_signed_with_the_staff_name(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("staff_reply", language, context("staff_reply"))
    assert rendered.text.startswith("Première ligne\n")
    assert "\n-- \nZoé Dupré\n" in rendered.text  # standard signature delimiter
    assert rendered.subject.startswith("[SUP-2026-000042] Re: ")


@pytest.mark.parametrize("language", LANGUAGES)
def test_rejection_reveals_no_detail(shipped: TemplateSet, language: str) -> None:
    generic = shipped.render("rejection", language, context("rejection", reason="x"))
    secret = "dkim=fail spf=softfail internal-rule-17"
    leaked = shipped.render("rejection", language, context("rejection", reason=secret))
    assert leaked == generic
    assert "SUP-" not in generic.subject
    # The customer's subject is never echoed into a mail to an unverified sender.
    assert "<script" not in generic.text
    for code in REJECTION_REASONS:
        assert shipped.render("rejection", language, context("rejection", reason=code)) != generic


# How each language writes day counts and the line number of a refused command.
DAYS = {"en": "{} days", "fr": "{} jours", "es": "{} días"}
DAY = {"en": "1 day", "fr": "1 jour", "es": "1 día"}
BUSINESS_DAYS = {"en": "{} business days", "fr": "{} jours ouvrés", "es": "{} días hábiles"}
BUSINESS_DAY = {"en": "1 business day", "fr": "1 jour ouvré", "es": "1 día hábil"}
LINE = {"en": "line {}: ", "fr": "ligne {} : ", "es": "línea {}: "}


@pytest.mark.parametrize("language", LANGUAGES)
def test_resolved_tells_how_to_reopen(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("resolved", language, context("resolved", reopen_days=21))
    assert rendered.subject.startswith("[SUP-2026-000042] ")
    assert "José Müller" in rendered.text
    for part in (rendered.text, rendered.html):
        assert DAYS[language].format(21) in part
        assert "[SUP-2026-000042]" in part  # keep the tag, or the reply opens a new ticket
    one = shipped.render("resolved", language, context("resolved", reopen_days=1))
    assert DAY[language] in one.text and DAYS[language].format(1) not in one.text
    # 0 turns reopening off: no "within 0 days", a reply opens a new ticket.
    never = shipped.render("resolved", language, context("resolved", reopen_days=0))
    assert DAYS[language].format(0) not in never.text + never.html
    assert "[SUP-2026-000042]" in never.text
    assert never.text != rendered.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_resolved_says_when_it_was_automatic(shipped: TemplateSet, language: str) -> None:
    by_staff = shipped.render("resolved", language, context("resolved"))
    automatic = shipped.render("resolved", language, context("resolved", auto_resolved=True))
    assert automatic.text != by_staff.text and automatic.html != by_staff.html
    assert automatic.subject == by_staff.subject
    assert DAYS[language].format(14) in automatic.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_waiting_reminder_says_what_happens_next(shipped: TemplateSet, language: str) -> None:
    kind = "waiting_reminder"
    rendered = shipped.render(kind, language, context(kind, resolve_after_days=7))
    assert rendered.subject.startswith("[SUP-2026-000042] ")
    assert "José Müller" in rendered.text
    for part in (rendered.text, rendered.html):
        assert BUSINESS_DAYS[language].format(7) in part
        assert "[SUP-2026-000042]" in part
    one = shipped.render(kind, language, context(kind, resolve_after_days=1))
    assert BUSINESS_DAY[language] in one.text
    assert BUSINESS_DAYS[language].format(1) not in one.text
    # 0: never resolved automatically, so the mail must not threaten it.
    never = shipped.render(kind, language, context(kind, resolve_after_days=0))
    assert BUSINESS_DAYS[language].format(0) not in never.text + never.html
    assert len(never.text) < len(rendered.text)


@pytest.mark.parametrize("language", LANGUAGES)
def test_staff_command_refused_lists_problems(shipped: TemplateSet, language: str) -> None:
    kind = "staff_command_refused"
    rendered = shipped.render(kind, language, context(kind))
    assert rendered.subject.startswith("[SUP-2026-000042] ")
    text, html = rendered.text, rendered.html
    line = LINE[language]
    assert f"{line.format(1)}`/statuss <script>alert('x')</script>` — unknown command" in text
    assert f"{line.format(3)}`/spend <b>lots</b> & more` — /spend: not a duration" in text
    # The lines are the staff member's words: text in the HTML part, never markup.
    assert "<code>/statuss &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</code>" in html
    assert "<code>/spend &lt;b&gt;lots&lt;/b&gt; &amp; more</code>" in html
    assert "<b>lots" not in html
    assert line.format(1) in html and line.format(3) in html
    for command in ("/status open|waiting|resolved|closed", "/priority P1|P2|P3", "/urgent",
                    "/assign me|EMAIL", "/level L1|L2|L3", "/spend 45m|1h30", "/cc EMAIL",
                    "/close", "/reopen", "/internal", "/bug"):  # fmt: skip
        assert command in text and command in html


@pytest.mark.parametrize("language", LANGUAGES)
def test_staff_command_refused_odd_problems(shipped: TemplateSet, language: str) -> None:
    kind = "staff_command_refused"
    long_line = {"line": 2, "text": "/cc " + "x" * 5000, "reason": "too long"}
    rendered = shipped.render(kind, language, context(kind, problems=[long_line]))
    assert "x" * 100 in rendered.text and "x" * 500 not in rendered.text  # shortened
    assert LINE[language].format(2) in rendered.text
    empty = shipped.render(kind, language, context(kind, problems=[]))
    assert empty.text.strip() and "<ul>" in empty.html


# SLA deadlines as the daemon formats them for the customer, and the labels the ack gives them.
DUE = {
    "en": ("Monday 24 November at 11:00", "Tuesday 25 November at 09:30",
           "Friday 28 November at 17:00"),
    "fr": ("lundi 24 novembre à 11:00", "mardi 25 novembre à 09:30",
           "vendredi 28 novembre à 17:00"),
    "es": ("lunes 24 de noviembre a las 11:00", "martes 25 de noviembre a las 09:30",
           "viernes 28 de noviembre a las 17:00"),
}  # fmt: skip
SLA_KINDS = ("first_response", "workaround", "resolution")
TARGET_LABELS = {
    "en": ("First response by", "Workaround by", "Resolution target"),
    "fr": ("Première réponse au plus tard", "Solution de contournement au plus tard",
           "Résolution visée au plus tard"),
    "es": ("Primera respuesta a más tardar", "Solución provisional a más tardar",
           "Resolución prevista a más tardar"),
}  # fmt: skip


def targets(language: str) -> list[dict[str, str]]:
    return [{"kind": k, "due": d} for k, d in zip(SLA_KINDS, DUE[language], strict=True)]


@pytest.mark.parametrize("language", LANGUAGES)
def test_ack_lists_the_sla_deadlines(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("ack", language, context("ack", targets=targets(language)))
    for label, due in zip(TARGET_LABELS[language], DUE[language], strict=True):
        assert f"{label}: {due}" in rendered.text or f"{label} : {due}" in rendered.text
        assert f">{label}</td><td>{due}</td>" in rendered.html
    # Only the targets the ticket has: no workaround target on this one.
    first_and_last = [targets(language)[0], targets(language)[2]]
    two = shipped.render("ack", language, context("ack", targets=first_and_last))
    assert TARGET_LABELS[language][1] not in two.text + two.html
    assert DUE[language][1] not in two.text + two.html
    assert TARGET_LABELS[language][2] in two.text and TARGET_LABELS[language][2] in two.html


@pytest.mark.parametrize("language", LANGUAGES)
def test_ack_without_targets_keeps_the_contract_wording(
    shipped: TemplateSet, language: str
) -> None:
    with_targets = shipped.render("ack", language, context("ack", targets=targets(language)))
    sla_off = shipped.render("ack", language, context("ack", targets=[]))
    for label in TARGET_LABELS[language]:
        assert label not in sla_off.text and label not in sla_off.html
    assert sla_off.text != with_targets.text
    assert "José Müller" in sla_off.text and "[SUP-2026-000042]" in sla_off.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_ack_deadline_markup_is_escaped(shipped: TemplateSet, language: str) -> None:
    hostile = [{"kind": "first_response", "due": "<b>lundi</b> 24\r\nnovembre"}]
    rendered = shipped.render("ack", language, context("ack", targets=hostile))
    assert "<b>" not in rendered.html
    assert "&lt;b&gt;lundi&lt;/b&gt; 24 novembre" in rendered.html
    assert "<b>lundi</b> 24 novembre" in rendered.text  # the line break does not split the line
    # A kind this version does not know is shown with a neutral label, never its code.
    unknown = shipped.render("ack", language, context("ack", targets=[{"kind": "x_y", "due": "1"}]))
    assert "x_y" not in unknown.text and "x y" not in unknown.text


# How each language names the SLA targets in staff notices, and writes a percentage.
CLOCK = {
    "en": ("first response", "workaround", "resolution"),
    "fr": ("première réponse", "solution de contournement", "résolution"),
    "es": ("primera respuesta", "solución provisional", "resolución"),
}
PERCENT = {"en": "{}%", "fr": "{} %", "es": "{} %"}
STAFF_DUE = "Tuesday 24 November at 11:00 (Europe/Brussels)"


def clock(kind: str = "first_response", percent: int = 80, minutes: int = 90) -> dict[str, object]:
    return {"kind": kind, "percent": percent, "due": STAFF_DUE, "target_minutes": minutes}


@pytest.mark.parametrize("language", LANGUAGES)
def test_sla_reminder_content(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("sla_reminder", language, context("sla_reminder", clock=clock()))
    percent = PERCENT[language].format(80)
    assert rendered.subject.startswith("[SUP-2026-000042] SLA ")
    assert percent in rendered.subject and STAFF_DUE in rendered.subject
    assert CLOCK[language][0] in rendered.subject
    for part in (rendered.text, rendered.html):
        assert percent in part
        assert CLOCK[language][0] in part
        assert STAFF_DUE in part
        assert "1 h 30 min" in part
        assert "support@example.com" in part  # replies go to the customer from there
    for kind, name in zip(SLA_KINDS[1:], CLOCK[language][1:], strict=True):
        other = shipped.render("sla_reminder", language, context("sla_reminder", clock=clock(kind)))
        assert name in other.subject and name in other.text and name in other.html
        assert CLOCK[language][0] not in other.text


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize(
    ("minutes", "shown"),
    [(15, "15 min"), (60, "1 h"), (90, "1 h 30 min"), (150, "2 h 30 min"), (1080, "18 h")],
)
def test_sla_target_durations(
    shipped: TemplateSet, language: str, minutes: int, shown: str
) -> None:
    values = context("sla_reminder", clock=clock(minutes=minutes))
    rendered = shipped.render("sla_reminder", language, values)
    assert f"({shown})" in rendered.text and f"({shown})" in rendered.html


# How each language says that a target was missed.
BREACHED = {"en": ("SLA breached", "was missed"), "fr": ("SLA dépassé", "n'a pas été respecté"),
            "es": ("SLA incumplido", "no se ha cumplido")}  # fmt: skip
ESCALATED = {"en": "escalated to level {}", "fr": "escaladé au niveau {}",
             "es": "escalado al nivel {}"}  # fmt: skip


@pytest.mark.parametrize("language", LANGUAGES)
def test_sla_breach_content(shipped: TemplateSet, language: str) -> None:
    ticket = {**context("sla_breach")["ticket"], "level": "L3"}  # type: ignore[dict-item]
    values = context("sla_breach", ticket=ticket, clock=clock("resolution", 100, 1080))
    rendered = shipped.render("sla_breach", language, values)
    headline, missed = BREACHED[language]
    assert rendered.subject.startswith(f"[SUP-2026-000042] {headline}")
    assert CLOCK[language][2] in rendered.subject and "Société & Fils" in rendered.subject
    for part in (rendered.text, rendered.html):
        assert missed in part
        assert ESCALATED[language].format("L3") in part
        assert CLOCK[language][2] in part
        assert STAFF_DUE in part
        assert "(18 h)" in part
        assert "support@example.com" in part
        assert "/assign EMAIL" in part  # what to do if someone else should take it


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", ["sla_reminder", "sla_breach"])
def test_sla_due_markup_is_escaped(shipped: TemplateSet, kind: str, language: str) -> None:
    hostile = {**clock(), "due": "<b>Tuesday</b> 24\r\nNovember <i>at</i> 11:00"}
    rendered = shipped.render(kind, language, context(kind, clock=hostile))
    assert "<b>" not in rendered.html and "<i>" not in rendered.html
    assert "&lt;b&gt;Tuesday&lt;/b&gt; 24 November &lt;i&gt;at&lt;/i&gt; 11:00" in rendered.html
    assert "<b>Tuesday</b> 24 November <i>at</i> 11:00" in rendered.text
    assert "\n" not in rendered.subject


# Prepaid support credit: dates as the ledger formats them, and the words the mails use.
EXPIRES = {"en": "23 November 2027", "fr": "23 novembre 2027", "es": "23 de noviembre de 2027"}
CREDITS = {"en": "{} credits", "fr": "{} crédits", "es": "{} créditos"}
ONE_CREDIT = {"en": "1 credit", "fr": "1 crédit", "es": "1 crédito"}
ONE_LEFT = {"en": "support credit: 1 credit (", "fr": "Il vous reste 1 crédit de support",
            "es": "Le queda 1 crédito de soporte"}  # fmt: skip
ZERO_CREDITS = {"en": "0 credits", "fr": "0 crédit", "es": "0 créditos"}  # French: singular
CREDIT_WORD = {"en": "credit", "fr": "crédit", "es": "crédito"}
QUARTER_HOUR = {"en": "1 credit = 15 minutes of support",
                "fr": "1 crédit = 15 minutes d'assistance",
                "es": "1 crédito = 15 minutos de soporte"}  # fmt: skip
USED_UP = {"en": "prepaid support credit is used up",
           "fr": "crédit de support prépayé de votre organisation est épuisé",
           "es": "crédito de soporte prepago de su organización se ha agotado"}  # fmt: skip
ACCEPTED = {"en": "we have of course accepted your request",
            "fr": "nous avons bien entendu pris en compte votre demande",
            "es": "hemos aceptado su solicitud"}  # fmt: skip
NEW_PACK = {"en": "buy a new pack", "fr": "acheter un nouveau pack",
            "es": "comprar un nuevo paquete"}  # fmt: skip
EXPIRING = {"en": "{} support credits", "fr": "{} crédits de support",
            "es": "{} créditos de soporte"}  # fmt: skip
ONE_EXPIRING = {"en": "1 support credit will", "fr": "1 crédit de support expirera",
                "es": "1 crédito de soporte caducará"}  # fmt: skip
PREPAID = {"en": "{0} prepaid support credit{1}", "fr": "{0} crédit{1} de support prépayé{1}",
           "es": "{0} crédito{1} de soporte prepago"}  # fmt: skip
BALANCE = {"en": "(balance: {})", "fr": "(solde : {})", "es": "(saldo: {})"}


def flat(text: str) -> str:
    """Text with its line breaks as spaces: the plain-text part wraps sentences by hand."""
    return " ".join(text.replace("&#39;", "'").split())


def credit(
    balance: int = 12, expires: str | None = None, flagged: bool = False
) -> dict[str, object]:
    return {"balance": balance, "expires": expires, "flagged": flagged}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", ["ack", "resolved"])
def test_credit_balance_and_expiry_shown(shipped: TemplateSet, kind: str, language: str) -> None:
    values = context(kind, credit=credit(12, EXPIRES[language]))
    rendered = shipped.render(kind, language, values)
    for part in (flat(rendered.text), flat(rendered.html)):
        assert CREDITS[language].format(12) in part
        assert QUARTER_HOUR[language] in part
        assert EXPIRES[language] in part
        assert USED_UP[language] not in part and ACCEPTED[language] not in part
    # One credit left: singular, and no expiry date when the ledger has none.
    one = shipped.render(kind, language, context(kind, credit=credit(1)))
    assert ONE_LEFT[language] in one.text and ONE_LEFT[language] in one.html
    assert CREDITS[language].format(1) not in one.text
    assert "None" not in one.text + one.html and EXPIRES[language] not in one.text


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", ["ack", "resolved"])
def test_no_credit_no_word_about_it(shipped: TemplateSet, kind: str, language: str) -> None:
    without = shipped.render(kind, language, context(kind, credit=None))
    assert CREDIT_WORD[language] not in without.text.lower()
    assert CREDIT_WORD[language] not in without.html.lower()
    assert "None" not in without.text + without.html
    # On prepaid credit, the same mail with one paragraph more.
    with_credit = shipped.render(kind, language, context(kind))
    assert with_credit.subject == without.subject
    paragraphs = with_credit.text.split("\n\n")
    extra = [p for p in paragraphs if CREDIT_WORD[language] in p.lower()]
    assert len(extra) == 1 and QUARTER_HOUR[language] in flat(extra[0])
    assert "\n\n".join(p for p in paragraphs if p not in extra) == without.text
    html_extra = re.findall(r"<p>[^<]*</p>\n", with_credit.html)
    html_extra = [p for p in html_extra if CREDIT_WORD[language] in p.lower()]
    assert len(html_extra) == 1
    assert with_credit.html.replace(html_extra[0], "") == without.html


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", ["ack", "resolved"])
def test_credit_used_up(shipped: TemplateSet, kind: str, language: str) -> None:
    zero = shipped.render(kind, language, context(kind, credit=credit(0)))
    overdraft = shipped.render(kind, language, context(kind, credit=credit(-3)))
    for rendered in (zero, overdraft):
        for part in (flat(rendered.text), flat(rendered.html)):
            assert USED_UP[language] in part
            assert NEW_PACK[language] in part
            assert ACCEPTED[language] not in part  # not flagged
            assert QUARTER_HOUR[language] not in part
    assert BALANCE[language].format(CREDITS[language].format(-3)) in overdraft.text
    assert BALANCE[language].split("{")[0] not in zero.text + zero.html  # no "(balance: 0 …)"


@pytest.mark.parametrize("language", LANGUAGES)
def test_flagged_ack_says_the_ticket_was_accepted(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("ack", language, context("ack", credit=credit(0, flagged=True)))
    for part in (flat(rendered.text), flat(rendered.html)):
        assert USED_UP[language] in part
        assert ACCEPTED[language] in part
        assert NEW_PACK[language] in part
    assert rendered.subject.startswith("[SUP-2026-000042] Re: ")  # nothing alarming up there
    # The resolved notice shows the balance as it is now; acceptance is old news there.
    resolved = shipped.render(
        "resolved", language, context("resolved", credit=credit(0, flagged=True))
    )
    assert USED_UP[language] in flat(resolved.text)
    assert ACCEPTED[language] not in flat(resolved.text)


@pytest.mark.parametrize("language", LANGUAGES)
def test_credit_expiry_markup_is_escaped(shipped: TemplateSet, language: str) -> None:
    hostile = credit(12, "<b>23</b> November\r\n2027 <script>x</script>")
    rendered = shipped.render("ack", language, context("ack", credit=hostile))
    assert "<b>" not in rendered.html and "<script" not in rendered.html
    assert "&lt;b&gt;23&lt;/b&gt; November 2027 &lt;script&gt;x&lt;/script&gt;" in rendered.html
    assert "<b>23</b> November 2027 <script>x</script>" in rendered.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_credit_low_content(shipped: TemplateSet, language: str) -> None:
    values = context("credit_low", expires=EXPIRES[language])
    rendered = shipped.render("credit_low", language, values)
    assert CREDITS[language].format(3) in rendered.subject
    assert "SUP-" not in rendered.subject
    for part in (flat(rendered.text), flat(rendered.html)):
        assert CREDITS[language].format(3) in part
        assert CREDITS[language].format(8) in part  # the threshold
        assert EXPIRES[language] in part
        assert QUARTER_HOUR[language] in part
        assert NEW_PACK[language] in part
        assert "support@example.com" in part
    assert "Société & Fils" in rendered.text
    one = shipped.render("credit_low", language, context("credit_low", balance=1, expires=None))
    assert ONE_CREDIT[language] in one.subject and CREDITS[language].format(1) not in one.subject
    assert "None" not in one.text + one.html
    # Used up or overdrawn (the ledger passes no expiry date then).
    for balance, count in ((0, ZERO_CREDITS[language]), (-2, CREDITS[language].format(-2))):
        values = context("credit_low", balance=balance, expires=None)
        out = shipped.render("credit_low", language, values)
        assert BALANCE[language].format(count) in out.subject
        assert USED_UP[language].split()[-1] in out.subject  # "up", "épuisé", "agotado"
        assert QUARTER_HOUR[language] not in out.text
        assert "None" not in out.text + out.html
    assert BALANCE[language].format(CREDITS[language].format(-2)) in flat(out.text)


@pytest.mark.parametrize("language", LANGUAGES)
def test_credit_low_large_numbers(shipped: TemplateSet, language: str) -> None:
    values = context("credit_low", balance=12500, threshold=20000)
    rendered = shipped.render("credit_low", language, values)
    shown = {"en": "12,500", "fr": "12\u202f500", "es": "12.500"}[language]  # fr: narrow nbsp
    assert CREDITS[language].format(shown) in rendered.text
    assert CREDITS[language].format(shown) in rendered.html
    assert CREDITS[language].format(flat(shown)) in rendered.subject  # whitespace made plain
    small = shipped.render("credit_low", language, context("credit_low", threshold=1500))
    assert (
        CREDITS[language].format({"en": "1,500", "fr": "1\u202f500", "es": "1500"}[language])
        in small.text
    )


@pytest.mark.parametrize("language", LANGUAGES)
def test_credit_expiry_content(shipped: TemplateSet, language: str) -> None:
    values = context("credit_expiry", expires=EXPIRES[language])
    rendered = shipped.render("credit_expiry", language, values)
    assert EXPIRING[language].format(5) in rendered.subject
    assert EXPIRES[language] in rendered.subject
    assert "SUP-" not in rendered.subject
    rollover = {"en": "carried over into it", "fr": "y seront reportés", "es": "se sumarán a él"}
    lost = {"en": "cannot be carried over", "fr": "ne peuvent pas être reportés",
            "es": "no se pueden trasladar"}  # fmt: skip
    for part in (flat(rendered.text), flat(rendered.html)):
        assert PREPAID[language].format(5, "s") in part and EXPIRES[language] in part
        assert rollover[language] in part and lost[language] not in part
    assert "Société & Fils" in rendered.text
    kept = shipped.render("credit_expiry", language, context("credit_expiry", rollover=False))
    assert lost[language] in flat(kept.text) and lost[language] in flat(kept.html)
    assert rollover[language] not in flat(kept.text)
    one = shipped.render("credit_expiry", language, context("credit_expiry", credits=1))
    assert ONE_EXPIRING[language] in one.subject
    for part in (flat(one.text), flat(one.html)):
        assert PREPAID[language].format(1, "") in part
        assert PREPAID[language].format(1, "s") not in part


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", ["credit_low", "credit_expiry"])
def test_credit_notice_names_are_escaped(shipped: TemplateSet, kind: str, language: str) -> None:
    values = context(kind, org_name="<b>Acme</b> & Co", person_name="José <b>Müller</b>")
    rendered = shipped.render(kind, language, values)
    assert "<b>Acme" not in rendered.html and "<b>Müller" not in rendered.html
    assert "&lt;b&gt;Acme&lt;/b&gt; &amp; Co" in rendered.html
    assert "José &lt;b&gt;Müller&lt;/b&gt;" in rendered.html
    assert "<b>Acme</b> & Co" in rendered.text and "José <b>Müller</b>" in rendered.text
    # No names: the mail still reads well ("Hello,", "your organisation").
    bare = shipped.render(kind, language, context(kind, org_name="", person_name=""))
    assert bare.text.split("\n")[0] in ("Hello,", "Bonjour,", "Hola:")
    assert " ," not in bare.text and ",," not in bare.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_rejection_no_credit(shipped: TemplateSet, language: str) -> None:
    rendered = shipped.render("rejection", language, context("rejection", reason="no_credit"))
    generic = shipped.render("rejection", language, context("rejection", reason="x"))
    for part in (flat(rendered.text), flat(rendered.html)):
        assert USED_UP[language] in part
        assert NEW_PACK[language] in part
    assert rendered.subject == generic.subject  # the subject says nothing about why
    assert USED_UP[language] not in flat(generic.text)


def test_sparse_values_render(shipped: TemplateSet) -> None:
    for language in LANGUAGES:
        for kind in KINDS:
            rendered = shipped.render(kind, language, sample_context(kind, sparse=True))
            assert "None" not in rendered.text and "None" not in rendered.subject


@pytest.mark.parametrize(
    ("requested", "used"),
    [("fr", "fr"), ("FR", "fr"), ("fr-BE", "fr"), ("es_ES", "es"), ("de", "en"),
     ("", "en"), (None, "en"), ("../en", "en"), ("fr/../../etc", "en")],
)  # fmt: skip
def test_language_resolution(shipped: TemplateSet, requested: str | None, used: str) -> None:
    assert shipped.resolve_language("ack", requested) == used
    assert f'lang="{used}"' in shipped.render("ack", requested, context("ack")).html


def copy_templates(tmp_path: Path, languages: tuple[str, ...] = ("en",)) -> Path:
    root = tmp_path / "templates"
    for lang in languages:
        shutil.copytree(SHIPPED / lang, root / lang)
    return root


def test_fallback_to_english_per_kind(tmp_path: Path) -> None:
    root = copy_templates(tmp_path, ("en", "fr"))
    # A French kind with one part missing is not used at all: never a mixed-language mail.
    (root / "fr" / "ack.html.j2").unlink()
    templates = TemplateSet(root)
    ack = templates.render("ack", "fr", context("ack"))
    assert ack.text.startswith("Hello José Müller,")
    assert 'lang="en"' in ack.html
    assert templates.render("staff_reply", "fr", context("staff_reply")).html.count('lang="fr"')
    # The spanish directory does not exist at all.
    assert templates.render("ack", "es", context("ack")).text.startswith("Hello")
    problems = templates.check()
    assert len(problems) == 1
    assert "fr/ack.html.j2: missing" in problems[0]


def test_check_names_the_broken_file(tmp_path: Path) -> None:
    root = copy_templates(tmp_path, ("en", "fr"))
    (root / "fr" / "ack.txt.j2").write_text("Bonjour {{ requester_name }\n", encoding="utf-8")
    (root / "fr" / "staff_reply.txt.j2").write_text("{{ reason }}\n", encoding="utf-8")
    (root / "en" / "rejection.subject.j2").write_text("{{ ''.__class__ }}\n", encoding="utf-8")
    (root / "fr" / "ack.subject.j2").write_text("Merci\n", encoding="utf-8")
    (root / "en" / "staff_new_ticket.html.j2").unlink()
    (root / "en" / "notes.j2").write_text("x", encoding="utf-8")
    problems = TemplateSet(root).check()
    joined = "\n".join(problems)
    assert f"{root}/fr/ack.txt.j2:1:" in joined  # syntax error, with its line
    assert f"{root}/fr/staff_reply.txt.j2:1: 'reason' is undefined" in joined  # not passed
    assert f"{root}/en/rejection.subject.j2" in joined  # sandbox refuses __class__
    assert f"{root}/fr/ack.subject.j2: does not contain the ticket number" in joined
    assert f"{root}/en/staff_new_ticket.html.j2: missing" in joined
    assert f"{root}/en/notes.j2: not named" in joined
    assert all(line.startswith(str(root)) for line in problems)


def test_check_without_english(tmp_path: Path) -> None:
    root = copy_templates(tmp_path, ("fr",))
    assert TemplateSet(root).check() == [
        f"{root}/en: missing; English templates are the fallback for every language"
    ]
    assert TemplateSet(tmp_path / "nowhere").check() == [
        f"{tmp_path}/nowhere: templates directory not found"
    ]


def test_render_errors(shipped: TemplateSet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks reason"):
        shipped.render("rejection", "en", context("ack"))
    with pytest.raises(ValueError):
        shipped.render("../ack", "en", {})
    with pytest.raises(LookupError):
        shipped.render("newsletter", "en", {})
    root = copy_templates(tmp_path)
    (root / "en" / "ack.txt.j2").write_text("{{ ticket.nope }}\n", encoding="utf-8")
    with pytest.raises(TemplateRenderError, match=r"en/ack\.txt\.j2:1"):
        TemplateSet(root).render("ack", "en", context("ack"))


def test_sandbox_blocks_python_internals(tmp_path: Path) -> None:
    root = copy_templates(tmp_path)
    evil = "{{ ticket.__class__.__mro__[1].__subclasses__() }}\n"
    (root / "en" / "ack.txt.j2").write_text(evil, encoding="utf-8")
    with pytest.raises(TemplateRenderError):
        TemplateSet(root).render("ack", "en", context("ack"))


def test_excerpt() -> None:
    assert excerpt("a\nb\n") == "a\nb"
    assert excerpt("\n".join(map(str, range(30))), max_lines=3) == "0\n1\n2\n[…]"
    # What a staff notice previews of a long mail: its first 20 lines.
    assert excerpt("\n".join(map(str, range(30)))) == "\n".join(map(str, range(20))) + "\n[…]"
    assert excerpt("x" * 50, max_chars=10) == "x" * 10 + "\n[…]"


@pytest.mark.parametrize("edit", ["syntax error", "files deleted", "folder deleted"])
def test_templates_edited_after_start_are_not_used_before_a_reload(
    install: Callable[..., Installation], tmp_path: Path, edit: str
) -> None:
    """Mail is rendered from the templates as read and checked at start (or at the
    last reload). An operator's edit that breaks them must not make every new mail
    a temporary failure, nor switch its language, before a reload checks it."""
    root = copy_templates(tmp_path, LANGUAGES)
    inst = install(settings={"templates_dir": str(root)})
    assert inst.app.templates.check() == []  # what the daemon's start and reload do
    if edit == "syntax error":
        (root / "fr" / "ack.txt.j2").write_text("Bonjour {{ requester_name }\n", encoding="utf-8")
    elif edit == "files deleted":  # French incomplete: English would be sent instead
        (root / "fr" / "ack.txt.j2").unlink()
        (root / "fr" / "_labels.j2").unlink()
    else:
        shutil.rmtree(root)

    assert inst.ingest(make_mail()).outcome == "created"
    [ack] = [m for m in inst.sent() if "alice@acme.example" in str(m["To"])]
    text = ack.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.startswith("Bonjour Alice Martin,")
    assert "Merci de nous avoir contactés." in text
    # What a reload would now read, and refuse.
    assert TemplateSet(root).check() != []
