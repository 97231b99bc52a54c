"""Priority rules: the shipped rules/*.yaml on realistic mails, the loader's
file:line problems, and the evaluation semantics on tiny rule sets."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailgate.pipeline.rules import (
    MAX_TEXT,
    Evaluation,
    Facts,
    RulesError,
    RuleSet,
    evaluate,
    load_rules,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("10-urgent.yaml", "20-critical.yaml", "30-major.yaml", "40-minor.yaml")


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    return load_rules(ROOT / "rules")


def mail(subject: str, body: str = "", **facts: Any) -> Facts:
    return Facts(subject=subject, body=body, **facts)


# --- the shipped rules on sample mails ------------------------------------------------------

OUTAGE, LOGIN = "critical outage", "critical login"
DATA, SECURITY = "critical data", "critical security"
SERVER_ERROR, NOT_WORKING, BLOCKED = "major server error", "major not working", "major blocked"
QUESTION, CATCH_ALL = "minor question", "minor catch-all"

# subject, body, expected priority, urgent, the rule that set the priority
SAMPLES = [
    # English
    pytest.param(
        "Service down since 9am",
        "Hi, nothing loads for the whole team: the service is down.",
        "P1", False, OUTAGE, id="en-service-down",
    ),
    pytest.param(
        "How do I log in with SSO?",
        "Hello, we just enabled SSO. How do I log in with my Google account?",
        "P3", False, QUESTION, id="en-how-do-i-log-in-stays-p3",
    ),
    pytest.param(
        "Download of the report",
        "The download of the monthly report takes a while since Monday.",
        "P3", False, CATCH_ALL, id="en-download-is-not-down",
    ),
    pytest.param(
        "[URGENT] question about invoices",
        "Could you send us a copy of invoice 2026-114 before Friday?",
        "P3", True, QUESTION, id="en-urgent-question-is-p3",
    ),
    pytest.param(
        "Cannot log in",
        "Since this morning the login page just reloads for every one of us.",
        "P1", False, LOGIN, id="en-cannot-log-in",
    ),
    pytest.param(
        "Portal",
        "Hi, I can’t log into the portal anymore, it says my session expired.",
        "P1", False, LOGIN, id="en-curly-apostrophe-log-into",
    ),
    pytest.param(
        "Dashboard",
        "Every time I open the dashboard I get an Error 500. Screenshot attached.",
        "P2", False, SERVER_ERROR, id="en-error-500-in-body",
    ),
    pytest.param(
        "CSV export",
        "The CSV export doesn't work since the update and we found no workaround.",
        "P2", False, NOT_WORKING, id="en-export-does-not-work",
    ),
    pytest.param(
        "App crashes on startup",
        "The mobile app crashes every time I open it (Android 14).",
        "P2", False, NOT_WORKING, id="en-crash",
    ),
    pytest.param(
        "All users see an error",
        "All users get an error page when they open the app.",
        "P1", False, OUTAGE, id="en-all-users-with-failure",
    ),
    pytest.param(
        "Export all users",
        "How can I export all users to a CSV file?",
        "P3", False, QUESTION, id="en-all-users-how-to-stays-p3",
    ),
    pytest.param(
        "Admin account",
        "We believe our admin account has been compromised: settings changed overnight.",
        "P1", False, SECURITY, id="en-account-compromised",
    ),
    pytest.param(
        "Response times",
        "Three days without an answer is a breach of our SLA.",
        "P3", False, CATCH_ALL, id="en-sla-breach-is-not-security",
    ),
    pytest.param(
        "Not urgent: typo on the pricing page",
        "There is a typo in the second paragraph.",
        "P3", False, CATCH_ALL, id="en-not-urgent-is-not-urgent",
    ),
    pytest.param(
        "Fwd: [urgent] Server is down",
        "Forwarding from our IT: the server is down for everyone.",
        "P1", True, OUTAGE, id="en-forwarded-urgent-outage",
    ),
    pytest.param(
        "Feature request: dark mode",
        "It would be nice to have a dark mode.",
        "P3", False, CATCH_ALL, id="en-feature-request",
    ),
    # French
    pytest.param(
        "URGENT: le site est en panne",
        "Bonjour, plus rien ne répond depuis 8h.",
        "P1", True, OUTAGE, id="fr-urgent-panne",
    ),
    pytest.param(
        "URGENT : Plus personne ne peut travailler",
        "Tout est figé depuis ce matin.",
        "P1", True, OUTAGE, id="fr-urgent-french-space-before-colon",
    ),
    pytest.param(
        "Données corrompues après l'import",
        "Après l'import d'hier, les fiches clients affichent n'importe quoi.",
        "P1", False, DATA, id="fr-donnees-corrompues",
    ),
    pytest.param(
        "Perte de donnees",
        "Tout l'historique de mars a disparu de notre compte.",
        "P1", False, DATA, id="fr-perte-de-donnees-sans-accent",
    ),
    pytest.param(
        "Problème de connexion",
        "Bonjour, impossible de se connecter depuis ce matin, ni pour moi ni pour mes collègues.",
        "P1", False, LOGIN, id="fr-impossible-de-se-connecter",
    ),
    pytest.param(
        "IMPOSSIBLE DE NOUS CONNECTER",
        "Merci de regarder rapidement.",
        "P1", False, LOGIN, id="fr-capitals",
    ),
    pytest.param(
        "Tous les utilisateurs",
        "Tous les utilisateurs ne peuvent plus accéder à leurs dossiers.",
        "P1", False, OUTAGE, id="fr-tous-les-utilisateurs",
    ),
    pytest.param(
        "Piratage de notre compte",
        "Nous pensons avoir été piratés cette nuit.",
        "P1", False, SECURITY, id="fr-piratage",
    ),
    pytest.param(
        "L'export ne fonctionne plus",
        "Depuis la mise à jour, l'export PDF ne fonctionne plus. Aucun contournement trouvé.",
        "P2", False, NOT_WORKING, id="fr-ne-fonctionne-plus",
    ),
    pytest.param(
        "Formulaire",
        "Bonjour, j'ai une ERREUR 500 quand je valide le formulaire de commande.",
        "P2", False, SERVER_ERROR, id="fr-erreur-500-in-body",
    ),
    pytest.param(
        "Saisie des commandes",
        "Nos commerciaux sont bloqués, ils ne peuvent plus saisir de commande.",
        "P2", False, BLOCKED, id="fr-bloques",
    ),
    pytest.param(
        "Question sur la facturation",
        "Bonjour, comment puis-je télécharger mes factures ?",
        "P3", False, QUESTION, id="fr-question",
    ),
    pytest.param(
        "Procédure de dépannage",
        "Bonjour, merci de m'envoyer la procédure de dépannage de l'imprimante.",
        "P3", False, CATCH_ALL, id="fr-depannage-is-not-panne",
    ),
    pytest.param(
        "[Urgente] Facture en double",
        "Nous avons reçu deux fois la même facture.",
        "P3", True, CATCH_ALL, id="fr-urgente-brackets",
    ),
    pytest.param(
        "Pas urgent : suggestion",
        "Une petite suggestion pour le tableau de bord.",
        "P3", False, CATCH_ALL, id="fr-pas-urgent",
    ),
    # Spanish
    pytest.param(
        "Caída del servicio",
        "Hola, el servicio no responde desde las 10.",
        "P1", False, OUTAGE, id="es-caida-del-servicio",
    ),
    pytest.param(
        "SERVICIO CAIDO",
        "Desde esta mañana nada carga.",
        "P1", False, OUTAGE, id="es-servicio-caido-sin-acento",
    ),
    pytest.param(
        "URGENTE: no funciona para nadie",
        "La plataforma no carga en ninguna oficina.",
        "P1", True, OUTAGE, id="es-urgente-outage",
    ),
    pytest.param(
        "No puedo iniciar sesion",
        "Me aparece un mensaje de contraseña incorrecta.",
        "P1", False, LOGIN, id="es-no-puedo-iniciar-sesion",
    ),
    pytest.param(
        "Pérdida de datos tras la actualización",
        "Faltan todos los pedidos de la semana pasada.",
        "P1", False, DATA, id="es-perdida-de-datos",
    ),
    pytest.param(
        "Cuenta",
        "Creemos que nuestra cuenta fue hackeada ayer por la noche.",
        "P1", False, SECURITY, id="es-hackeada",
    ),
    pytest.param(
        "Error 500 al guardar",
        "Cuando guardo el formulario aparece un error.",
        "P2", False, SERVER_ERROR, id="es-error-500",
    ),
    pytest.param(
        "La exportación",
        "Desde ayer la exportación a Excel no funciona.",
        "P2", False, NOT_WORKING, id="es-no-funciona",
    ),
    pytest.param(
        "¿Cómo puedo cambiar mi contraseña?",
        "Gracias de antemano.",
        "P3", False, QUESTION, id="es-como-puedo",
    ),
    pytest.param(
        "Sugerencia",
        "Sería útil poder mover el bloque de texto del pie de página.",
        "P3", False, CATCH_ALL, id="es-bloque-noun-is-not-blocked",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("subject", "body", "priority", "urgent", "rule"), SAMPLES)
def test_shipped_rules_classify_sample_mails(
    shipped: RuleSet, subject: str, body: str, priority: str, urgent: bool, rule: str
) -> None:
    found = evaluate(shipped, mail(subject, body))
    if rule == CATCH_ALL:  # recognised by no rule: the plan default (P3 shipped) decides
        assert "priority" not in found.values and found.matched[-1] == CATCH_ALL, found
        assert priority == "P3"
    else:
        assert found.values["priority"] == priority, found
        assert found.set_by["priority"] == rule, found
    assert found.values.get("urgent", False) is urgent, found
    assert ("urgent" in found.tags) is urgent


def test_sample_table_covers_three_languages_and_every_priority_rule() -> None:
    assert len(SAMPLES) >= 30
    languages = {p.id.split("-")[0] for p in SAMPLES}
    assert languages == {"en", "fr", "es"}
    rules = {p.values[4] for p in SAMPLES}
    assert {OUTAGE, LOGIN, DATA, SECURITY, SERVER_ERROR, NOT_WORKING, BLOCKED} <= rules
    assert {QUESTION, CATCH_ALL} <= rules


def test_urgent_only_from_the_subject_marker(shipped: RuleSet) -> None:
    found = evaluate(shipped, mail("Invoice", "URGENT: please answer [URGENT]"))
    assert "urgent" not in found.values
    for subject in ("Urgent matter", "urgently needed", "Re: non-urgent: docs", "no urgente: duda"):
        assert "urgent" not in evaluate(shipped, mail(subject)).values, subject
    for subject in ("Re: URGENT: x", "[ urgent ] x", "urgente : x", "Tr: [URGENTE] x"):
        assert evaluate(shipped, mail(subject)).values["urgent"] is True, subject


def test_tags_say_what_was_recognised(shipped: RuleSet) -> None:
    ransom = evaluate(
        shipped,
        mail("[URGENT] Ransomware", "Our files are encrypted, data loss on the shared drive."),
    )
    assert ransom.tags == ("urgent", "data-loss", "security")
    assert ransom.matched[-1] == "critical decided"  # stopped: no P2/P3 tags
    assert evaluate(shipped, mail("Broken export", "no workaround")).tags == ("broken", "blocked")
    assert evaluate(shipped, mail("How to export?")).tags == ("question",)
    assert evaluate(shipped, mail("Hello", "")).tags == ("triage",)


def test_catch_all_decides_any_mail(shipped: RuleSet) -> None:
    for facts in (mail("", ""), mail("x", "y", has_attachment=True)):
        found = evaluate(shipped, facts)
        assert (found.values, found.matched, found.tags) == ({}, (CATCH_ALL,), ("triage",))


# --- the shipped files themselves ---------------------------------------------------------


def test_shipped_files_load_without_problems(shipped: RuleSet) -> None:
    assert shipped.files == SHIPPED
    assert sorted(p.name for p in (ROOT / "rules").iterdir()) == list(SHIPPED)
    names = [rule.name for rule in shipped.rules]
    assert len(names) == len(set(names))  # load_rules refuses duplicates; say it here too
    for rule in shipped.rules:
        assert rule.source.startswith(str(ROOT / "rules"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_start_with_an_operator_comment(name: str) -> None:
    text = (ROOT / "rules" / name).read_text(encoding="utf-8")
    head = text.splitlines()[:3]
    assert all(line.startswith("#") for line in head), head
    assert "first matching rule that sets" in text.lower() or "first setter" in text.lower()


@pytest.mark.parametrize(
    ("name", "priority", "decided"),
    [("20-critical.yaml", "P1", "critical decided"), ("30-major.yaml", "P2", "major decided")],
)
def test_decided_rule_repeats_every_priority_rule_of_its_file(
    shipped: RuleSet, name: str, priority: str, decided: str
) -> None:
    """The stop rule lists the priority rules' conditions through YAML aliases: a new rule
    that is not added there would let its mails run on into P2/P3 tags (`triage`)."""
    rules = [r for r in shipped.rules if Path(r.source.rsplit(":", 1)[0]).name == name]
    *setters, last = rules
    assert last.name == decided and last.then.stop and last.then.priority is None
    assert all(r.then.priority == priority and r.then.tags and not r.then.stop for r in setters)
    assert last.when.any == [r.when for r in setters]


def test_urgent_rule_does_not_stop_or_set_a_priority(shipped: RuleSet) -> None:
    (urgent,) = [r for r in shipped.rules if r.source.split(":")[0].endswith("10-urgent.yaml")]
    assert (urgent.then.urgent, urgent.then.tags) == (True, ["urgent"])
    assert urgent.then.priority is None and not urgent.then.stop


# --- loading: problems reported as file:line --------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load_rules(directory)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


RULE = "rules:\n  - name: a\n"
UNKNOWN = "unknown key (see the list of conditions and values in the rules docs)"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param(
            RULE + "    when:\n      subjet: [x]\n    then: {priority: P1}\n",
            f"4: rules.0.when.subjet: {UNKNOWN}",
            id="unknown-condition",
        ),
        pytest.param(
            RULE + "    when: {subject: [x]}\n    then: {priority: P1, colour: red}\n",
            f"4: rules.0.then.colour: {UNKNOWN}",
            id="unknown-value",
        ),
        pytest.param(
            RULE + "    when:\n      any:\n        - subject: [x]\n        - all:\n"
            "            - bodyy: [y]\n    then: {priority: P1}\n",
            f"7: rules.0.when.any.1.all.0.bodyy: {UNKNOWN}",
            id="unknown-key-nested",
        ),
        pytest.param(
            RULE + "    when: {subject: [x]}\n    then:\n      priority: P4\n",
            "5: rules.0.then.priority: Input should be 'P1', 'P2' or 'P3'",
            id="bad-priority",
        ),
        pytest.param(
            RULE + "    when:\n      subject_regex: '(unclosed'\n    then: {priority: P1}\n",
            "4: rules.0.when.subject_regex: '(unclosed' is not a valid regular expression: "
            "missing ) at position 9",
            id="bad-regex",
        ),
        pytest.param(
            RULE + "    when:\n      header:\n        X-Priority: '[1'\n    then: {priority: P1}\n",
            "5: rules.0.when.header: '[1' is not a valid regular expression: "
            "unterminated character set at position 2",
            id="bad-header-regex",
        ),
        pytest.param(
            RULE + "    when: {subject: [x]\n    then: {priority: P1}\n",
            "4: not valid YAML: expected ',' or '}', but got '<scalar>'",
            id="yaml-syntax-error",
        ),
        pytest.param(
            "rules:\n\t- name: a\n",
            "2: not valid YAML: found character '\\t' that cannot start any token",
            id="yaml-tab",
        ),
        pytest.param(
            RULE + "    when: {}\n    then: {priority: P1}\n",
            "3: rules.0.when: an empty condition matches everything; write what it should test",
            id="empty-condition",
        ),
        pytest.param(
            RULE + "    when: {subject: [x]}\n",
            "2: rules.0.then: Field required",
            id="missing-then",
        ),
        pytest.param(
            "rules:\n  - when: {subject: [x]}\n    then: {priority: P1}\n",
            "2: rules.0.name: Field required",
            id="missing-name",
        ),
        pytest.param(
            RULE + "    when:\n      subject: urgent\n    then: {priority: P1}\n",
            "4: rules.0.when.subject: Input should be a valid list",
            id="keyword-string-instead-of-list",
        ),
        pytest.param(
            RULE + "    when:\n      role: [owner]\n    then: {priority: P1}\n",
            "4: rules.0.when.role.0: Input should be 'admin' or 'member'",
            id="bad-role",
        ),
        pytest.param(
            RULE + "    when:\n      time: {from: '18:00', to: '08:00', weekdays: [Sat]}\n"
            "    then: {priority: P1}\n",
            "4: rules.0.when.time.weekdays.0: "
            "Input should be 'mon', 'tue', 'wed', 'thu', 'fri', 'sat' or 'sun'",
            id="bad-weekday",
        ),
        pytest.param(
            "- name: a\n",
            "1: the file must be a mapping with a `rules:` list",
            id="not-a-mapping",
        ),
        pytest.param(  # YAML reads it as a date that Python cannot build: was a traceback
            RULE + "    when:\n      subject: [2026-02-30]\n    then: {priority: P1}\n",
            "4: rules.0.when.subject.0: '2026-02-30' is not a date (day is out of range for"
            " month): write a real one as YYYY-MM-DD",
            id="impossible-date",
        ),
    ],
)
def test_invalid_file_is_reported_at_its_line(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, "50-bad.yaml", text)
    assert problems_of(tmp_path) == [f"{path}:{where}"]


def test_a_plain_string_where_a_list_is_expected_names_the_key(tmp_path: Path) -> None:
    write(tmp_path, "50-bad.yaml", RULE + "    when: {text: panne}\n    then: {priority: P1}\n")
    (problem,) = problems_of(tmp_path)
    assert "rules.0.when.text:" in problem and "valid list" in problem


def test_duplicate_rule_name_is_reported_at_the_second(tmp_path: Path) -> None:
    rule = "rules:\n  - name: Same name\n    when: {subject: [x]}\n    then: {priority: P1}\n"
    first = write(tmp_path, "10-a.yaml", rule)
    second = write(tmp_path, "20-b.yaml", "# another file\n" + rule)
    assert problems_of(tmp_path) == [
        f"{second}:3: rule name 'Same name' already used at {first}:2; names must be unique"
    ]


def test_every_problem_of_the_directory_is_reported_at_once(tmp_path: Path) -> None:
    good = write(tmp_path, "10-good.yaml", RULE + "    when: {subject: [x]}\n    then: {}\n")
    bad_yaml = write(tmp_path, "20-bad.yaml", "rules: [\n")
    bad_rules = write(
        tmp_path,
        "30-worse.yaml",
        RULE + "    when: {}\n    then: {priority: P0}\n"
        "  - name: b\n    when: {subject: [y]}\n    then: {}\n",
    )
    duplicate = write(tmp_path, "40-dup.yaml", RULE + "    when: {body: [z]}\n    then: {}\n")
    problems = problems_of(tmp_path)
    assert problems == [
        f"{bad_yaml}:2: not valid YAML: expected the node content, but found '<stream end>'",
        f"{bad_rules}:3: rules.0.when: an empty condition matches everything; "
        "write what it should test",
        f"{bad_rules}:4: rules.0.then.priority: Input should be 'P1', 'P2' or 'P3'",
        f"{duplicate}:2: rule name 'a' already used at {good}:2; names must be unique",
    ]


def test_rule_names_of_a_refused_file_are_not_checked_for_duplicates(tmp_path: Path) -> None:
    """A file with a problem contributes no rules, so its names are compared once it is fixed."""
    write(tmp_path, "10-good.yaml", RULE + "    when: {subject: [x]}\n    then: {}\n")
    bad = write(tmp_path, "20-bad.yaml", RULE + "    when: {subject: [x]}\n    then: {level: L9}\n")
    assert problems_of(tmp_path) == [
        f"{bad}:4: rules.0.then.level: Input should be 'L1', 'L2' or 'L3'"
    ]


def test_directory_without_rules(tmp_path: Path) -> None:
    assert load_rules(tmp_path) == RuleSet()  # an empty folder: no rules
    write(tmp_path, "10-comments.yaml", "# nothing yet\n")
    write(tmp_path, "20-other.yml", "# *.yml is read too\n")
    write(tmp_path, "README", "rules: 3\n")  # other names are not
    loaded = load_rules(tmp_path)
    assert (loaded.rules, loaded.files) == ((), ("10-comments.yaml", "20-other.yml"))


def test_a_missing_rules_folder_is_an_error_not_no_rules(tmp_path: Path) -> None:
    """A typo in rules_dir, or rules/ left out of a copy, must not quietly give every
    ticket the default priority."""
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path / "missing", setting="settings.yaml: rules_dir")
    assert err.value.problems == [
        f"settings.yaml: rules_dir: {tmp_path / 'missing'} not found (create the folder with "
        "the rule files; an empty folder means no rules)"
    ]
    write(tmp_path, "10-a-file.yaml", "rules: []\n")
    with pytest.raises(RulesError, match="10-a-file.yaml is not a folder"):
        load_rules(tmp_path / "10-a-file.yaml")


# --- evaluation semantics on tiny rule sets -------------------------------------------------


def rules_from(tmp_path: Path, *rules: dict[str, Any], name: str = "50-test.yaml") -> RuleSet:
    write(tmp_path, name, yaml.safe_dump({"rules": list(rules)}, allow_unicode=True))
    return load_rules(tmp_path)


def rule(name: str, when: dict[str, Any], **then: Any) -> dict[str, Any]:
    return {"name": name, "when": when, "then": then}


def test_first_setter_wins_and_later_rules_fill_unset_values(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        rule("first", {"text": ["panne"]}, priority="P1", tags=["a"]),
        rule("not matching", {"text": ["nothing here"]}, priority="P3", assignee="nobody"),
        rule("second", {"text": ["panne"]}, priority="P2", assignee="alice", level="L2"),
        rule("third", {"text": ["panne"]}, urgent=False, level="L3", group="ops"),
        rule("fourth", {"text": ["panne"]}, urgent=True, tags=["b"]),
    )
    found = evaluate(rules, mail("Panne", ""))
    assert found == Evaluation(
        matched=("first", "second", "third", "fourth"),
        values={"priority": "P1", "assignee": "alice", "level": "L2", "urgent": False,
                "group": "ops"},
        tags=("a", "b"),
        set_by={"priority": "first", "assignee": "second", "level": "second",
                "urgent": "third", "group": "third"},
    )  # fmt: skip


def test_stop_ends_the_evaluation(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        rule("sets", {"subject": ["x"]}, tags=["one"]),
        rule("stops", {"subject": ["x"]}, tags=["two"], stop=True),
        rule("never", {"subject": ["x"]}, priority="P1", tags=["three"]),
    )
    found = evaluate(rules, mail("x"))
    assert (found.matched, found.values, found.tags) == (("sets", "stops"), {}, ("one", "two"))
    # a stop rule that does not match stops nothing
    assert evaluate(rules, mail("y")).matched == ()


def test_stop_runs_across_files(tmp_path: Path) -> None:
    rules_from(tmp_path, rule("b", {"subject": ["x"]}, priority="P2"), name="20-b.yaml")
    rules = rules_from(tmp_path, rule("a", {"subject": ["x"]}, stop=True), name="10-a.yaml")
    assert rules.files == ("10-a.yaml", "20-b.yaml")
    assert evaluate(rules, mail("x")).matched == ("a",)


def test_tags_accumulate_in_order_without_duplicates(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        rule("r1", {"body": ["x"]}, tags=["b", "a"]),
        rule("r2", {"body": ["x"]}, tags=["a", "c", "b"]),
        rule("r3", {"body": ["x"]}, tags=["c", "d"]),
    )
    assert evaluate(rules, mail("", "x")).tags == ("b", "a", "c", "d")


def test_header_condition(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, rule("vip", {"header": {"X-Priority": "^[12]"}}, priority="P2"))
    for headers, matched in [
        ({"x-priority": ["1 (Highest)"]}, True),
        ({"x-priority": ["3", "2"]}, True),  # any of the header's values
        ({"x-priority": ["3 (Normal)"]}, False),
        ({"x-priority": [" 1"]}, False),  # the regex says ^
        ({"importance": ["high"]}, False),
        ({}, False),
    ]:
        assert bool(evaluate(rules, mail("s", headers=headers)).matched) is matched, headers


def test_header_values_are_matched_ignoring_case(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, rule("list", {"header": {"List-Id": r"alerts\.acme"}}, tags=["x"]))
    assert evaluate(rules, mail("s", headers={"list-id": ["<ALERTS.ACME.example>"]})).matched


@pytest.mark.parametrize(
    ("moment", "inside"),
    [
        (datetime(2026, 11, 23, 22, 0), True),  # Monday 22:00, the window opens
        (datetime(2026, 11, 23, 23, 59), True),
        (datetime(2026, 11, 24, 0, 0), True),  # Tuesday, after midnight
        (datetime(2026, 11, 24, 5, 59), True),
        (datetime(2026, 11, 24, 6, 0), False),  # the window is closed at `to`
        (datetime(2026, 11, 23, 21, 59), False),
        (datetime(2026, 11, 23, 12, 0), False),
        (datetime(2026, 11, 28, 23, 0), False),  # Saturday: not a listed weekday
        (datetime(2026, 11, 29, 3, 0), False),  # Sunday
        # The weekday is the moment's own: Saturday 03:00 (the tail of Friday's
        # night) is out, Monday 03:00 (the tail of Sunday's night) is in.
        (datetime(2026, 11, 28, 3, 0), False),
        (datetime(2026, 11, 23, 3, 0), True),
    ],
)
def test_time_window_over_midnight_on_weekdays(
    tmp_path: Path, moment: datetime, inside: bool
) -> None:
    window = {"from": "22:00", "to": "06:00", "weekdays": ["mon", "tue", "wed", "thu", "fri"]}
    rules = rules_from(tmp_path, rule("night", {"time": window}, level="L2"))
    assert bool(evaluate(rules, mail("s", local_time=moment)).matched) is inside


def test_time_window_within_a_day_and_without_a_time(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, rule("office", {"time": {"from": "09:00", "to": "18:00"}}))
    saturday = datetime(2026, 11, 28, 9, 0)
    assert evaluate(rules, mail("s", local_time=saturday)).matched  # every day by default
    assert not evaluate(rules, mail("s", local_time=saturday.replace(hour=18))).matched
    assert not evaluate(rules, mail("s", local_time=None)).matched


def test_nested_any_and_all(tmp_path: Path) -> None:
    panne_or_file = {"any": [{"text": ["panne"]}, {"has_attachment": True}]}
    when = {
        "any": [
            {"all": [{"plan": ["enterprise"]}, panne_or_file]},
            {"subject": ["escalade"], "role": ["admin"]},
        ]
    }
    rules = rules_from(tmp_path, rule("nested", when, priority="P1"))
    for facts, matched in [
        (mail("Panne", plan="enterprise"), True),
        (mail("Hello", plan="enterprise", has_attachment=True), True),
        (mail("Hello", plan="enterprise"), False),
        (mail("Panne", plan="basic"), False),
        (mail("Escalade demandée", role="admin"), True),
        (mail("Escalade demandée", role="member"), False),  # both keys of a mapping hold
    ]:
        assert bool(evaluate(rules, facts).matched) is matched, facts


def test_who_conditions(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        rule("org", {"organisation": ["acme", "globex"]}, tags=["org"]),
        rule("plan", {"plan": ["enterprise"]}, tags=["plan"]),
        rule("role", {"role": ["admin"]}, tags=["role"]),
        rule("lang", {"language": ["fr", "es"]}, tags=["lang"]),
        rule("files", {"has_attachment": False}, tags=["no-files"]),
    )
    facts = mail("s", organisation="acme", plan="enterprise", role="admin", language="es")
    assert evaluate(rules, facts).tags == ("org", "plan", "role", "lang", "no-files")
    other = mail("s", organisation="ACME", plan="basic", role="member", language="en",
                 has_attachment=True)  # fmt: skip
    assert evaluate(rules, other).tags == ()  # exact values: "ACME" is not "acme"
    assert evaluate(rules, mail("s")).tags == ("no-files",)  # unknown sender: None


def test_keywords_are_whole_words_or_phrases(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, rule("kw", {"text": ["down", "error 500", "log in"]}))
    hit = ["Site DOWN", "it is down.", "(down)", "Error 500!", "please log in", "down-time"]
    miss = ["download", "countdown", "error 5000", "error500", "login", "log into"]
    for text in hit:
        assert evaluate(rules, mail(text)).matched, text
    for text in miss:
        assert not evaluate(rules, mail(text)).matched, text


def test_keywords_fold_case_and_accents_both_ways(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, rule("kw", {"text": ["Données corrompues", "caido"]}))
    for text in ("donnees corrompues", "DONNÉES CORROMPUES", "Donnèes Corrompûes", "CAÍDO"):
        assert evaluate(rules, mail(text)).matched, text
    assert not evaluate(rules, mail("donnes corrompues")).matched  # a missing letter is not folded


def test_subject_body_and_text_keywords(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        rule("s", {"subject": ["alpha"]}, tags=["s"]),
        rule("b", {"body": ["alpha"]}, tags=["b"]),
        rule("t", {"text": ["alpha"]}, tags=["t"]),
    )
    assert evaluate(rules, mail("Alpha", "")).tags == ("s", "t")
    assert evaluate(rules, mail("", "ALPHA")).tags == ("b", "t")


def test_regexes_search_the_folded_text(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        rule("plain", {"subject_regex": r"\bechec\b"}, tags=["plain"]),
        rule("accented", {"subject_regex": "échec"}, tags=["accented"]),
        rule("upper", {"body_regex": r"ERR-\d+"}, tags=["upper"]),
        rule("text", {"text_regex": r"^ticket"}, tags=["text"]),
    )
    assert evaluate(rules, mail("ÉCHEC de l'import", "err-42")).tags == ("plain", "upper")
    # an accented regex never matches: the text it searches has no accents
    assert "accented" not in evaluate(rules, mail("échec")).tags
    assert evaluate(rules, mail("x", "Ticket 12")).tags == ("text",)


def test_only_the_start_of_a_long_body_is_read(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, rule("kw", {"body": ["needle"]}))
    assert evaluate(rules, mail("", "x" * (MAX_TEXT - 7) + " needle")).matched
    assert not evaluate(rules, mail("", "x " * MAX_TEXT + "needle")).matched


# --- bugs found in review, fixed in mailgate/pipeline/rules.py --------------------------


def test_phrase_keyword_matches_across_a_line_break(shipped: RuleSet) -> None:
    """A phrase that a plain-text mail wraps onto the next line is still recognised."""
    body = (
        "Bonjour, depuis ce matin il nous est impossible de se\n"
        "connecter à la plateforme, pour toute l'équipe.\n"
    )
    found = evaluate(shipped, mail("Plateforme", body))
    assert found.values["priority"] == "P1", (
        f"'impossible de se connecter' wrapped over two lines is not recognised: {found}"
    )


def test_condition_key_left_empty_is_refused(tmp_path: Path) -> None:
    """`subject:` with nothing after it would test nothing, so match every mail: refused."""
    write(tmp_path, "50-bad.yaml", RULE + "    when:\n      subject:\n    then: {priority: P1}\n")
    try:
        rules = load_rules(tmp_path)
    except RulesError as exc:
        problems = exc.problems
    else:
        found = evaluate(rules, mail("Thanks!", "All good, thank you."))
        problems = []
    assert problems, f"`when: {{subject: }}` loaded and matches every mail: {found}"


def test_unquoted_time_of_day_is_refused(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted 18:00 as the integer 1080 (base 60): refused, not misread."""
    write(
        tmp_path,
        "50-night.yaml",
        RULE + "    when:\n      time: {from: 18:00, to: 08:00}\n    then: {level: L2}\n",
    )
    with pytest.raises(RulesError) as refused:
        load_rules(tmp_path)
    assert 'write the time quoted, as "HH:MM"' in refused.value.problems[0]
    assert refused.value.problems[0].startswith(f"{tmp_path / '50-night.yaml'}:")
