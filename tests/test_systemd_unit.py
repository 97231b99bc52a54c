"""systemd/mailgate.service and its sysusers entry, checked by systemd's own tools.

`.ci/run` installs systemd, so a missing `systemd-analyze` fails these tests
instead of skipping them: an unchecked unit is how a typo ships.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.cli import EX_CONFIG, EX_TEMPFAIL
from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "mailgate.service"
SYSUSERS = ROOT / "systemd" / "mailgate.sysusers"
INSTALLED_BINARY = "/opt/mailgate/.venv/bin/mailgate"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package 'systemd' (.ci/run does)")
    return path


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with its binary pointed at one that exists here (verify checks it)."""
    binary = Path(sys.executable).with_name("mailgate")
    if not binary.exists():
        binary = Path(sys.executable)
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    unit = tmp_path / "mailgate.service"
    unit.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return unit


def test_systemd_analyze_verify_reports_nothing(testable_unit: Path) -> None:
    proc = run(tool("systemd-analyze"), "verify", "--man=no", "--recursive-errors=no",
               testable_unit.name, cwd=testable_unit.parent)  # fmt: skip
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    assert output == "", f"systemd-analyze verify complained:\n{output}"


def test_unit_stays_hardened(testable_unit: Path) -> None:
    # Exposure 0-100 (shown as 0.0-10.0); the shipped unit scores about 1.8.
    # A lost hardening line pushes it over the threshold.
    proc = run(tool("systemd-analyze"), "security", "--offline=yes", "--threshold=25",
               "--no-pager", str(testable_unit))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unit_has_the_operator_contract() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "TimeoutStopSec": "30",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "mailgate",
        "UMask": "0027",
        "StateDirectory": "mailgate",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/mailgate",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["ExecStart"] == (
        f"{INSTALLED_BINARY} --config /etc/mailgate/settings.yaml run --log-format json"
    )
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_only_failures_a_restart_cannot_mend_stop_the_restarts() -> None:
    """`mailgate run` exits EX_CONFIG on a bad setting or a port another program
    holds (tests/test_daemon_lifecycle.py): restarting every RestartSec would
    only fill the journal. A database not up yet (EX_TEMPFAIL) or a crash (1)
    is restarted."""
    service = parse_unit(UNIT.read_text())["Service"]
    prevented = service["RestartPreventExitStatus"].split()
    assert prevented == [str(EX_CONFIG)]
    assert str(EX_TEMPFAIL) not in prevented and "1" not in prevented


def test_exec_start_is_a_valid_command_line() -> None:
    from mailgate.cli import build_parser

    argv = parse_unit(UNIT.read_text())["Service"]["ExecStart"].split()[1:]
    args = build_parser().parse_args(argv)
    assert (args.config, args.log_format) == ("/etc/mailgate/settings.yaml", "json")
    assert args.handler.__name__ == "cmd_run"


def test_capability_comment_tells_when_to_drop_it() -> None:
    text = UNIT.read_text()
    comment = text[: text.index("CapabilityBoundingSet=")].rsplit("\n\n", 1)[1]
    assert "1024" in comment and "CAP_NET_BIND_SERVICE" in comment


def test_sysusers_entry_creates_the_service_user(tmp_path: Path) -> None:
    proc = run(tool("systemd-sysusers"), f"--root={tmp_path}", "--dry-run", str(SYSUSERS))
    assert proc.returncode == 0, proc.stderr
    assert "Creating user 'mailgate'" in proc.stderr + proc.stdout
    assert "/var/lib/mailgate" in SYSUSERS.read_text()  # the unit's StateDirectory
