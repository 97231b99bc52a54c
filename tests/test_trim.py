"""trim_reply on replies as the mail clients staff use actually write them."""

from __future__ import annotations

import re
import time

import pytest

from mailgate.pipeline.trim import DEFAULT_MARKERS, trim_reply

REPLY_MARKER = r"^-{2,} ?Reply above this line ?-{2,}$"


# --- Gmail ----------------------------------------------------------------------


def test_gmail_english() -> None:
    mail = (
        "Hi Alice,\n"
        "\n"
        "The printer driver is now installed.\n"
        "\n"
        "Bob\n"
        "\n"
        "On Mon, 3 Nov 2026 at 10:02, Alice Martin <alice@example.com> wrote:\n"
        "\n"
        "> Hello,\n"
        "> my printer does not work.\n"
        ">\n"
        "> Alice\n"
    )
    assert trim_reply(mail) == "Hi Alice,\n\nThe printer driver is now installed.\n\nBob"


def test_gmail_english_wrapped_attribution_without_at() -> None:
    mail = (
        "Done, see the attached log.\n"
        "\n"
        "On Mon, Nov 3, 2026 10:02 AM Alice Martin <\n"
        "alice@example.com> wrote:\n"
        "\n"
        "> Can you send the log?\n"
    )
    assert trim_reply(mail) == "Done, see the attached log."


def test_gmail_attribution_wrapped_over_three_lines() -> None:
    mail = (
        "Fixed.\n"
        "\n"
        "On Mon, 3 Nov 2026 at 10:02, Alice Martin from the Accounting\n"
        "Department of ACME <alice.martin@accounting.acme.example>\n"
        "wrote:\n"
        "> Still broken.\n"
    )
    assert trim_reply(mail) == "Fixed."


def test_gmail_french() -> None:
    mail = (
        "Bonjour Alice,\n"
        "\n"
        "C'est corrigé, pouvez-vous réessayer ?\n"
        "\n"
        "Le lun. 3 nov. 2026 à 10:02, Alice Martin <alice@example.com> a écrit :\n"
        "\n"
        "> Bonjour,\n"
        "> l'imprimante ne marche plus.\n"
    )
    assert trim_reply(mail) == "Bonjour Alice,\n\nC'est corrigé, pouvez-vous réessayer ?"


def test_gmail_french_wrapped_with_narrow_nbsp_and_no_space() -> None:
    wrapped = (
        "Merci.\n\nLe lun. 3 nov. 2026 à 10:02, Alice Martin <alice@example.com> a\n"
        "écrit\u202f:\n\n> Bonjour\n"
    )
    no_space = "Merci.\n\nLe 03/11/2026 à 10:02, Alice Martin a écrit:\n> Bonjour\n"
    assert trim_reply(wrapped) == "Merci."
    assert trim_reply(no_space) == "Merci."


def test_french_attribution_without_accent_over_unquoted_history() -> None:
    """Clients limited to ASCII write "a ecrit"; some quote without ">" at all."""
    mail = (
        "C'est corrige.\n"
        "\n"
        "Le 03/11/2026 a 10:02, Alice Martin <alice@example.com> a ecrit :\n"
        "Bonjour,\n"
        "l'imprimante ne marche plus.\n"
    )
    assert trim_reply(mail) == "C'est corrige."


def test_gmail_spanish() -> None:
    mail = (
        "Hola Alicia,\n"
        "\n"
        "Ya está resuelto.\n"
        "\n"
        "El lun, 3 nov 2026 a las 10:02, Alice Martin (<alice@example.com>) escribió:\n"
        "\n"
        "> Hola,\n"
        "> la impresora no funciona.\n"
    )
    assert trim_reply(mail) == "Hola Alicia,\n\nYa está resuelto."


def test_german_attribution() -> None:
    mail = (
        "Erledigt.\n\nAm 03.11.2026 um 10:02 schrieb Alice Martin <alice@example.com>:\n> Hallo\n"
    )
    assert trim_reply(mail) == "Erledigt."


# --- Outlook --------------------------------------------------------------------


def test_outlook_desktop_english_header_block() -> None:
    mail = (
        "Hello Alice,\n"
        "\n"
        "I reset your password.\n"
        "\n"
        "Regards,\n"
        "Bob\n"
        "\n"
        "From: Alice Martin <alice@example.com>\n"
        "Sent: Monday, November 3, 2026 10:02 AM\n"
        "To: Support <support@example.com>\n"
        "Subject: RE: [SUP-2026-000001] Password\n"
        "\n"
        "I cannot log in.\n"
    )
    assert trim_reply(mail) == "Hello Alice,\n\nI reset your password.\n\nRegards,\nBob"


def test_outlook_desktop_french_header_block() -> None:
    mail = (
        "Bonjour,\n"
        "\n"
        "Le mot de passe est réinitialisé.\n"
        "\n"
        "De : Alice Martin <alice@example.com>\n"
        "Envoyé : lundi 3 novembre 2026 10:02\n"
        "À : Support <support@example.com>\n"
        "Objet : RE: [SUP-2026-000001] Mot de passe\n"
        "\n"
        "Je ne peux plus me connecter.\n"
    )
    assert trim_reply(mail) == "Bonjour,\n\nLe mot de passe est réinitialisé."


def test_outlook_desktop_spanish_header_block() -> None:
    mail = (
        "Hola,\n"
        "\n"
        "Contraseña restablecida.\n"
        "\n"
        "De: Alice Martin <alice@example.com>\n"
        "Enviado el: lunes, 3 de noviembre de 2026 10:02\n"
        "Para: Soporte <support@example.com>\n"
        "Asunto: RE: [SUP-2026-000001] Contraseña\n"
        "\n"
        "No puedo entrar.\n"
    )
    assert trim_reply(mail) == "Hola,\n\nContraseña restablecida."


def test_outlook_underscore_rule() -> None:
    mail = (
        "Thanks, closing the ticket.\n"
        "\n"
        "________________________________\n"
        "From: Alice Martin <alice@example.com>\n"
        "Sent: Monday, November 3, 2026 10:02\n"
        "To: Support\n"
        "Subject: Re: Printer\n"
        "\n"
        "It works now.\n"
    )
    assert trim_reply(mail) == "Thanks, closing the ticket."


def test_outlook_underscore_rule_french() -> None:
    mail = (
        "Merci.\n"
        "________________________________\n"
        "De : Alice Martin\n"
        "Envoyé : lundi 3 novembre 2026 10:02\n"
        "\n"
        "Ça marche.\n"
    )
    assert trim_reply(mail) == "Merci."


@pytest.mark.parametrize(
    "separator",
    [
        "-----Original Message-----",
        "----- Message d'origine -----",
        "-----Message d'origine-----",
        "-----Mensaje original-----",
    ],
)
def test_original_message_separators(separator: str) -> None:
    mail = f"See you tomorrow.\n\n{separator}\nFrom: Alice\nSent: Monday\n\nHello\n"
    assert trim_reply(mail) == "See you tomorrow."


def test_underscore_line_alone_is_not_a_cut() -> None:
    mail = "Steps:\n____________________________\n1. Open the tray.\n2. Remove the paper."
    assert trim_reply(mail) == mail


# --- Thunderbird and Apple Mail -------------------------------------------------


def test_thunderbird() -> None:
    mail = (
        "Hi,\n"
        "\n"
        "please restart the service.\n"
        "\n"
        "On 03/11/2026 10:02, Alice Martin wrote:\n"
        "> The service is down.\n"
        ">\n"
        "> -- \n"
        "> Alice\n"
    )
    assert trim_reply(mail) == "Hi,\n\nplease restart the service."


def test_apple_mail_wrapped_attribution() -> None:
    mail = (
        "Yes, tomorrow at 9.\n"
        "\n"
        "On 3 Nov 2026, at 10:02, Alice Martin <alice@example.com>\n"
        "wrote:\n"
        "\n"
        "> Can we meet?\n"
    )
    assert trim_reply(mail) == "Yes, tomorrow at 9."


def test_iphone_footer_and_quoted_attribution() -> None:
    mail = (
        "Ok, I will call her.\n"
        "\n"
        "Sent from my iPhone\n"
        "\n"
        "> On Nov 3, 2026, at 10:02, Alice Martin <alice@example.com> wrote:\n"
        "> \n"
        "> Please call me.\n"
    )
    assert trim_reply(mail) == "Ok, I will call her."


@pytest.mark.parametrize(
    "footer",
    [
        "Sent from my iPhone",
        "Sent from my Galaxy",
        "Envoyé de mon iPhone",
        "Enviado desde mi iPhone",
        "Get Outlook for iOS",
        "Get Outlook for Android<https://aka.ms/ghei36>",
        "Sent from Outlook",
        "Envoyé à partir de Outlook pour Android",
    ],
)
def test_mobile_footers(footer: str) -> None:
    assert trim_reply(f"On it.\n\n{footer}\n") == "On it."


def test_footer_words_mid_text_are_kept() -> None:
    mail = "Sent from my iPhone the logs do not upload.\nCan you check the proxy?"
    assert trim_reply(mail) == mail


# --- Signatures -----------------------------------------------------------------


def test_rfc3676_signature() -> None:
    mail = (
        "The invoice is attached.\n"
        "\n"
        "-- \n"
        "Bob Durand\n"
        "Support team, ACME\n"
        "+33 1 23 45 67 89\n"
        "\n"
        "On Mon, 3 Nov 2026 at 10:02, Alice <alice@example.com> wrote:\n"
        "> Where is my invoice?\n"
    )
    assert trim_reply(mail) == "The invoice is attached."


def test_bare_double_dash_signature() -> None:
    assert trim_reply("Done.\n--\nBob\n") == "Done."


def test_strip_signature_false_keeps_signature_and_footer() -> None:
    mail = (
        "Done.\n"
        "\n"
        "-- \n"
        "Bob\n"
        "Sent from my iPhone\n"
        "\n"
        "On Mon, 3 Nov 2026 at 10:02, Alice <alice@example.com> wrote:\n"
        "> Is it done?\n"
    )
    assert trim_reply(mail, strip_signature=False) == "Done.\n\n-- \nBob\nSent from my iPhone"


# --- What must not be cut -------------------------------------------------------


def test_interleaved_reply_is_kept_intact() -> None:
    mail = (
        "Hi Alice,\n"
        "\n"
        "On Mon, 3 Nov 2026 at 10:02, Alice Martin <alice@example.com> wrote:\n"
        "> 1. Is the server up?\n"
        "\n"
        "Yes, since 9:00.\n"
        "\n"
        "> 2. Can I log in?\n"
        "\n"
        "Not yet, tomorrow.\n"
        "\n"
        "-- \n"
        "Bob\n"
    )
    expected = mail.split("\n\n-- \n")[0]
    assert trim_reply(mail) == expected


def test_interleaved_reply_drops_only_the_trailing_quote() -> None:
    mail = "> Is it fixed?\nYes.\n> And the backup?\nRunning now.\n>\n> Thanks,\n> Alice\n"
    assert trim_reply(mail) == "> Is it fixed?\nYes.\n> And the backup?\nRunning now."


def test_bottom_posted_reply_with_signature_below_quote() -> None:
    mail = (
        "Thanks, it is fixed.\n"
        "\n"
        "On Mon, 3 Nov 2026 at 10:02, Alice <alice@example.com> wrote:\n"
        "> Please fix it.\n"
        "\n"
        "-- \n"
        "Bob\n"
    )
    assert trim_reply(mail) == "Thanks, it is fixed."


def test_custom_attribution_above_trailing_quote() -> None:
    mail = "Fixed.\n\nAlice Martin <alice@example.com> wrote:\n> Broken.\n"
    assert trim_reply(mail) == "Fixed."


def test_message_that_is_only_a_quote_is_returned_unchanged() -> None:
    mail = "> Is anyone there?\n> Alice\n\n"
    assert trim_reply(mail) == "> Is anyone there?\n> Alice"


def test_message_starting_with_attribution_is_returned_unchanged() -> None:
    mail = "On Mon, 3 Nov 2026 at 10:02, Alice <alice@example.com> wrote:\n> Hello?\n"
    assert trim_reply(mail) == mail.rstrip()


def test_forward_is_not_cut() -> None:
    mail = (
        "FYI, see the customer's mail below.\n"
        "\n"
        "---------- Forwarded message ---------\n"
        "From: Carol <carol@customer.example>\n"
        "Date: Mon, 3 Nov 2026 at 10:02\n"
        "Subject: Broken printer\n"
        "To: <support@example.com>\n"
        "\n"
        "The printer is broken.\n"
    )
    assert trim_reply(mail) == mail.rstrip()


def test_forward_keeps_content_below_the_signature() -> None:
    mail = (
        "FYI.\n"
        "-- \n"
        "Bob\n"
        "\n"
        "Begin forwarded message:\n"
        "\n"
        "From: Carol <carol@customer.example>\n"
        "Date: 3 November 2026 at 10:02:00 CET\n"
        "\n"
        "Broken.\n"
    )
    assert trim_reply(mail) == (
        "FYI.\n\nBegin forwarded message:\n\nFrom: Carol <carol@customer.example>\n"
        "Date: 3 November 2026 at 10:02:00 CET\n\nBroken."
    )


def test_outlook_forward_is_not_cut() -> None:
    mail = (
        "Please handle this one.\n"
        "\n"
        "________________________________\n"
        "From: Carol <carol@customer.example>\n"
        "Sent: Monday, November 3, 2026 10:02\n"
        "To: Bob\n"
        "Subject: FW: Broken printer\n"
        "\n"
        "Broken.\n"
    )
    assert trim_reply(mail) == mail.rstrip()


def test_prose_from_line_is_not_cut() -> None:
    mail = (
        "The bounce you received says:\n"
        "From: MAILER-DAEMON, the address does not exist.\n"
        "Please check the spelling and send it again.\n"
    )
    assert trim_reply(mail) == mail.rstrip()


def test_schedule_from_to_is_not_cut() -> None:
    mail = "Maintenance window tonight:\nFrom: 22:00\nTo: 23:30\nThe portal will be offline.\n"
    assert trim_reply(mail) == mail.rstrip()


def test_prose_on_line_ending_in_wrote_is_not_cut() -> None:
    mail = "On the ticket you wrote:\nthe printer is offline. Is it still the case?\n"
    assert trim_reply(mail) == mail.rstrip()


# --- Options, markers and normalisation -----------------------------------------


def test_extra_markers() -> None:
    mail = (
        "Your laptop is ready for pickup.\n"
        "\n"
        "---- Reply above this line ----\n"
        "Ticket SUP-2026-000001 was updated.\n"
    )
    assert trim_reply(mail) == mail.rstrip()  # not a default marker
    assert trim_reply(mail, extra_markers=[REPLY_MARKER]) == "Your laptop is ready for pickup."
    # Case-insensitive, and searched anywhere in the line.
    assert trim_reply(mail, extra_markers=["reply ABOVE"]) == "Your laptop is ready for pickup."


def test_extra_marker_invalid_regex_raises() -> None:
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        trim_reply("text", extra_markers=["("])


def test_a_catastrophic_extra_marker_gives_up_and_is_not_a_marker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator's marker runs on quoted customer text, which anyone can craft."""
    mail = "Done, the log shows:\n" + "a" * 400 + "!\nMore text of mine.\n"
    started = time.monotonic()
    assert trim_reply(mail, extra_markers=["(a|aa)+$"]) == mail.strip()
    assert time.monotonic() - started < 2
    assert "'(a|aa)+$' gave up" in caplog.text


def test_crlf_and_cr_input() -> None:
    crlf = "Done.\r\n\r\nOn Mon, 3 Nov 2026 at 10:02, Alice <alice@example.com> wrote:\r\n> Hi\r\n"
    assert trim_reply(crlf) == "Done."
    assert trim_reply("Line 1\r\nLine 2\rLine 3\r\n\r\n") == "Line 1\nLine 2\nLine 3"


def test_internal_whitespace_kept_and_edges_stripped() -> None:
    mail = "\n\n   indented first line  \n\n\n  second  \n\n-- \nBob\n"
    assert trim_reply(mail) == "   indented first line  \n\n\n  second"


def test_empty_and_blank_input() -> None:
    assert trim_reply("") == ""
    assert trim_reply(" \r\n\t\n") == ""


def test_default_markers_are_valid_regexes() -> None:
    assert DEFAULT_MARKERS
    for source in DEFAULT_MARKERS:
        re.compile(source)


# --- Hostile input --------------------------------------------------------------


def test_megabyte_of_adversarial_text_is_trimmed() -> None:
    # Near-misses of every marker, each short enough (< 500 characters) and
    # ending in ":" so that it reaches the regexes rather than being skipped by
    # the line-length bound or the cheap checks: long runs of "On "/"wrote"/"-"
    # that a nested or overlapping quantifier would backtrack over exponentially
    # or quadratically. The first three lines also wrap into one 1,300-character
    # attribution candidate. Plus quote runs broken by text, and one huge line.
    near_misses = [
        "On " * 160,
        "wrote " * 70,
        "On " * 150 + "wrote x:",
        "Le " * 150 + "a  écrit x:",
        "El " * 150 + "escribió x:",
        "Am " * 160 + ":",
        "-" * 240 + " Original  Message " + "-" * 200 + "x",
        "_" * 450 + "x",
        "From:" + " " * 400 + "x",
        ">" * 480,
        "Sent from my " + "x " * 200 + ":",
        "-- " + " " * 400 + "x",
    ]
    lines: list[str] = []
    while sum(map(len, lines)) < 1_000_000:
        lines.extend(near_misses)
    lines.append("On " * 100_000 + "wrote:")  # a 300 kB line
    lines.append("The end.")
    text = "\n".join(lines)
    assert len(text) > 1_000_000
    assert trim_reply(text, extra_markers=[REPLY_MARKER]) == text


def test_hundred_thousand_lines_of_alternating_quotes_and_attributions() -> None:
    # Every attribution is followed by a quote and then more text, so each one
    # is examined as a possible inline reply: quadratic if the look-ahead is not
    # bounded by the next non-quoted line.
    block = [
        "On Mon, 3 Nov 2026 at 10:02, Alice <alice@example.com> wrote:",
        "> quoted",
        "",
        "answer",
        "From: x",
    ]
    lines = block * 20_000 + ["> trailing quote"] * 100
    text = "\n".join(lines)
    assert len(lines) >= 100_000
    assert trim_reply(text) == "\n".join(block * 20_000)
