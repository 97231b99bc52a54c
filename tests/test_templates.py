"""The shipped templates and TemplateSet: every kind in every language, escaping, fallback."""

from __future__ import annotations

import shutil
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
    if kind != "rejection":
        assert escaped in rendered.html
        assert raw in rendered.text or raw in rendered.subject
    for name in ("José Müller", "Zoé Dupré", "Société & Fils"):
        if name in rendered.text:
            assert name.replace("&", "&amp;") in rendered.html


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
    assert excerpt("x" * 50, max_chars=10) == "x" * 10 + "\n[…]"
