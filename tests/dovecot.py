"""A real Dovecot IMAP server for tests, on loopback ports, entirely under one temp dir.

    server = start_dovecot(tmp_path)                      # plain IMAP (STARTTLS off)
    server = start_dovecot(tmp_path, tls=True)            # + implicit TLS and STARTTLS
    server = start_dovecot(tmp_path, without=("MOVE",))   # MOVE not advertised
    server = start_dovecot(tmp_path, oauth2_introspection_url=url)  # + XOAUTH2, OAUTHBEARER
    server = start_dovecot(tmp_path, auth_delays=False)   # refused logins answered at once
    server = start_dovecot(tmp_path, acl="INBOX owner lrs")  # global ACL (read-only INBOX)
    server = start_dovecot(tmp_path, namespace=("INBOX.", "."))  # Courier's folder names
    try:
        uid = server.append(raw)
        ...
    finally:
        server.stop()

No system configuration is read or touched: the configuration is written from
scratch (/etc/dovecot is never included), base_dir, state_dir, the log and the
mail all live under `root`, and the master runs in the foreground as a child of
the test process (`dovecot -F`), in its own session. `stop()` ends it with
SIGTERM; logged-in clients get "* BYE Server shutting down.".

Details worth knowing:

- one user (`support@example.com` unless told otherwise) with a PLAIN password
  in a passwd-file; Maildir under root/mail/<user>; the inbox namespace uses
  "/" as its separator and no prefix (Gmail, Exchange, many Dovecots), so
  "mailgate/processed" is a valid folder name; `namespace=(prefix, separator)`
  gives it another: ("", ".") is Dovecot's own default for Maildir, where a
  name with "/" in it is refused, ("INBOX.", ".") Courier's, where every folder
  is below INBOX;
- run as root, the internal and login processes run as the Debian package's
  `dovecot` and `dovenull` users and the mail as `nobody` (Dovecot refuses to
  access mail as root), so the temp dirs above `root` are made traversable
  (o+x, never readable); run as another user, everything runs as that user
  (Dovecot's "rootless" mode: no chroot);
- `without=(...)` sets `imap_capability` to the server's default post-login
  capability list minus those names (the list is asked of a started server once
  per test session); the server still *accepts* the commands, it just does
  not advertise them, which is what clients decide on;
- `oauth2_introspection_url=...` adds the SASL mechanisms XOAUTH2 and OAUTHBEARER,
  checked by Dovecot's oauth2 passdb with an RFC 7662 token introspection request
  to that URL (POST, form body `token=<the token>`, no Authorization header); the
  reply must be JSON with `"active": true` and `"username"` equal to the login
  name (any other reply, or `"active": false`, refuses the login). The
  passwd-file passdb then serves only PLAIN and LOGIN, so the helpers below keep
  logging in with the password and a token is never taken for a password;
- a refused login is answered after `auth_failure_delay` (2 s), and every later
  authentication from 127.0.0.1 waits 4, 8, then 15 s (the anvil "auth
  penalty", even for a correct password, even with login_trusted_networks)
  until one succeeds: a test that refuses logins on purpose wants
  `auth_delays=False` (no failure delay; the anvil-auth-penalty socket is moved
  where the auth process does not look for it, which turns the penalty off);
- `acl=...` turns on the acl plugin with a global ACL file (root/global-acl,
  Dovecot 2.3 "vfile" syntax: `<mailbox pattern> <identifier> <rights>`), read
  again at every access (cache_secs=0): `set_acl()` changes it on a running
  server. `INBOX owner lrs` leaves INBOX readable but nothing can be deleted
  or expunged there, so PERMANENTFLAGS lacks \\Deleted and MOVE is refused;
- `recreate_inbox()` changes INBOX's UIDVALIDITY with `doveadm mailbox update
  --uid-validity`, which also disconnects sessions that have INBOX selected
  ("* BYE IMAP session state is inconsistent, please relogin."), then expunges
  and re-appends every message (same bytes, flags and internal date, new UIDs).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import imapclient

from tests.smtp_sink import free_port, make_certificate

START_TIMEOUT = 10.0  # seconds; a start normally takes well under one
STOP_TIMEOUT = 10.0
INSTALL_HINT = (
    "Dovecot is needed by the IMAP tests: install the Debian package dovecot-imapd "
    "(apt-get install dovecot-imapd; .ci/run does it)"
)
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Capabilities the imap process appends by itself after `imap_capability`
# (src/imap/imap-client.c), so they cannot be removed through that setting.
_ADDED_BY_DOVECOT = frozenset(
    {"LITERAL+", "LITERAL-", "SEARCH=FUZZY", "NOTIFY", "URLAUTH", "URLAUTH=BINARY", "METADATA",
     "SPECIAL-USE"}
)  # fmt: skip
_default_capabilities: tuple[str, ...] | None = None  # asked of the first started server
_running: dict[int, Dovecot] = {}  # stopped at exit if a test forgot to


class DovecotError(AssertionError):
    """Dovecot could not be found, started or stopped (a test failure, not a skip)."""


def find_binary(name: str) -> str:
    """The path of a Dovecot program; /usr/sbin is searched even when not on PATH."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)
    if found is None:
        raise DovecotError(f"{name} not found. {INSTALL_HINT}")
    return found


@functools.cache
def dovecot_version(binary: str) -> str:
    """`dovecot --version`, e.g. "2.3.19.1 (9b53102964)"; Dovecot 2.4 is refused.

    The configuration written here is Dovecot 2.3's (Debian 12); 2.4 (Debian 13)
    changed most of its syntax.
    """
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    version = done.stdout.strip()
    match = re.match(r"(\d+)\.(\d+)", version)
    if done.returncode != 0 or match is None:
        raise DovecotError(f"{binary} --version failed: {done.stderr.strip()}. {INSTALL_HINT}")
    if (int(match[1]), int(match[2])) >= (2, 4):
        raise DovecotError(f"tests/dovecot.py writes Dovecot 2.3 configuration, not {version}")
    return version


@dataclass
class Dovecot:
    root: Path
    port: int
    tls_port: int | None = None
    user: str = "support@example.com"
    password: str = "imap-secret"
    cert: Path | None = None
    key: Path | None = None
    capability: str | None = None  # the imap_capability setting; None: Dovecot's default
    oauth2_introspection_url: str | None = None  # XOAUTH2/OAUTHBEARER checked there
    auth_delays: bool = True  # Dovecot's failure delay and penalty after refused logins
    acl: str | None = None  # the global ACL file's text; None: no acl plugin
    namespace: tuple[str, str] = ("", "/")  # the personal namespace's prefix and separator
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    # -- paths -------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def oauth2_config(self) -> Path:
        """The oauth2 passdb's settings (written only with oauth2_introspection_url)."""
        return self.root / "dovecot-oauth2.conf.ext"

    @property
    def acl_path(self) -> Path:
        return self.root / "global-acl"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / self.user

    @property
    def base_dir(self) -> Path:
        # Unix socket paths must stay under 108 bytes; the longest name below
        # base_dir is "token-login/imap-urlauth".
        run = self.root / "run"
        if len(str(run)) <= 70:
            return run
        short = Path(tempfile.gettempdir()) / f"dovecot-{self.port}"
        return short

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> Dovecot:
        """Write the configuration, start the master and wait for the "* OK" greeting."""
        if self._proc is not None and self._proc.poll() is None:
            raise DovecotError(f"Dovecot on port {self.port} is already running")
        binary = find_binary("dovecot")
        dovecot_version(binary)
        self._prepare()
        stderr = open(self.root / "dovecot.stderr", "ab")  # noqa: SIM115 - kept by Popen
        with stderr:
            self._proc = subprocess.Popen(
                [binary, "-F", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True,  # Ctrl-C in pytest is not sent to Dovecot
            )  # fmt: skip
        _running[id(self)] = self
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                _running.pop(id(self), None)
                raise DovecotError(f"dovecot exited while starting.\n{self.log_tail()}")
            if self._greets() and (self.tls_port is None or _accepts(self.tls_port)):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise DovecotError(
                    f"dovecot did not greet on 127.0.0.1:{self.port} within "
                    f"{START_TIMEOUT:.0f}s.\n{self.log_tail()}"
                )
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the master (SIGTERM) and wait until it exited and the ports are closed."""
        proc, self._proc = self._proc, None
        _running.pop(id(self), None)
        if proc is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        if proc.poll() is None:
            proc.terminate()
        told: set[int] = set()
        while proc.poll() is None:
            # On SIGTERM the master ends its services, but a logged-in imap process
            # only notices after ~10 s: end those directly (they say "* BYE Server
            # shutting down." as they go). Then the master tells its log process to
            # quit and sleeps one second whatever happens, holding the listening
            # sockets: once only the log process is left, end the master right away
            # (the log process drains what it has and exits on its own).
            others = []
            for pid in _session(proc.pid):
                name = _process_name(pid)
                if pid == proc.pid or name.endswith("/log"):
                    continue
                others.append(pid)
                if name.endswith("/imap") and pid not in told:
                    told.add(pid)
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
            if not others or time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.002)
        ports = [p for p in (self.port, self.tls_port) if p is not None]
        while any(_accepts(p) for p in ports):
            if time.monotonic() > deadline:
                raise DovecotError(f"ports {ports} still accept after dovecot stopped")
            time.sleep(0.002)
        if self.base_dir.parent != self.root:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop, then start again on the same ports, configuration and mail."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Dovecot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The end of Dovecot's log (and of its stderr), for failure messages."""
        parts = []
        for path in (self.log_path, self.root / "dovecot.stderr"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or f"(nothing in {self.log_path})"

    def set_acl(self, text: str) -> None:
        """Replace the global ACL (started with acl=...): in force at the next access."""
        if self.acl is None:
            raise DovecotError("this Dovecot was started without acl=...")
        self.acl = text
        self.acl_path.write_text(text)

    # -- clients -----------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this server's test certificate (and checks it)."""
        if self.cert is None:
            raise DovecotError("this Dovecot was started without tls=True")
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, *, tls: bool = False) -> imapclient.IMAPClient:
        """A client logged in as the test user: plain port, or implicit TLS on tls_port."""
        if tls:
            if self.tls_port is None:
                raise DovecotError("this Dovecot was started without tls=True")
            client = imapclient.IMAPClient(
                "127.0.0.1", self.tls_port, ssl=True, ssl_context=self.ssl_context(), timeout=10
            )
        else:
            client = imapclient.IMAPClient("127.0.0.1", self.port, ssl=False, timeout=10)
        try:
            self._login(client)
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def _login(self, client: imapclient.IMAPClient) -> None:
        # Dovecot answers "[UNAVAILABLE] Temporary authentication failure" now and
        # then when a test polls with a login every 50 ms on a loaded machine (its
        # auth process busy): the test's own look at the mailbox tries again.
        # Five tries 0.2 s apart still failed about once in 17 runs of one test:
        # up to 7 s now, and the server's log with the last failure.
        attempts = 10
        for attempt in range(attempts):
            try:
                client.login(self.user, self.password)
                return
            except imapclient.exceptions.LoginError as exc:
                if "[UNAVAILABLE]" not in str(exc):
                    raise
                if attempt == attempts - 1:
                    raise DovecotError(f"login still refused: {exc}\n{self.log_tail()}") from exc
                time.sleep(min(0.2 * 2**attempt, 1.0))

    @contextlib.contextmanager
    def session(self, *, tls: bool = False) -> Iterator[imapclient.IMAPClient]:
        """`client()` that logs out at the end of the with-block."""
        client = self.client(tls=tls)
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def append(self, raw: bytes, folder: str = "INBOX", flags: Iterable[bytes | str] = ()) -> int:
        """APPEND one message (creating the folder if needed); its UID, from APPENDUID."""
        with self.session() as client:
            if folder.upper() != "INBOX" and not client.folder_exists(folder):
                client.create_folder(folder)
            response = client.append(folder, raw, flags=tuple(flags))
        return _appenduid(response)

    def uids(self, folder: str = "INBOX") -> list[int]:
        with self.session() as client:
            client.select_folder(folder, readonly=True)
            return sorted(client.search(["ALL"]))

    def fetch_all(self, folder: str = "INBOX") -> dict[int, bytes]:
        """Every message of the folder by UID, byte for byte (BODY.PEEK[]: no \\Seen)."""
        with self.session() as client:
            client.select_folder(folder, readonly=True)
            uids = sorted(client.search(["ALL"]))
            if not uids:
                return {}
            data = client.fetch(uids, ["BODY.PEEK[]"])
        return {uid: bytes(data[uid][b"BODY[]"]) for uid in uids}

    def uidvalidity(self, folder: str = "INBOX") -> int:
        with self.session() as client:
            return int(client.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"])

    def recreate_inbox(self) -> None:
        """Give INBOX a new UIDVALIDITY (the old one + 1) and keep its messages.

        Sessions that have INBOX selected are disconnected by Dovecot. The messages
        keep their bytes, flags and internal dates, in the same order, under new
        UIDs, all above the old ones (the old UIDNEXT on): a client that ignores
        UIDVALIDITY sees every message as new.
        """
        with self.session() as client:
            client.normalise_times = False  # keep the server's time zone on re-append
            old = int(client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"])
            uids = sorted(client.search(["ALL"]))
            data = client.fetch(uids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]) if uids else {}
        new = old + 1 if old < 0xFFFFFFFF else 1
        self.doveadm("mailbox", "update", "-u", self.user, "--uid-validity", str(new), "INBOX")
        if uids:
            self.doveadm("expunge", "-u", self.user, "mailbox", "INBOX", "all")
            with self.session() as client:
                for uid in uids:
                    item = data[uid]
                    flags = [f for f in item[b"FLAGS"] if f.lower() != b"\\recent"]
                    client.append("INBOX", bytes(item[b"BODY[]"]), flags=flags,
                                  msg_time=item[b"INTERNALDATE"])  # fmt: skip
        now = self.uidvalidity()
        if now != new:
            raise DovecotError(f"UIDVALIDITY of INBOX is {now} after recreate, not {new}")

    def doveadm(self, *args: str) -> str:
        """Run `doveadm -c <our config> ARGS`; its stdout (DovecotError if it fails)."""
        done = subprocess.run(
            [find_binary("doveadm"), "-c", str(self.config), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if done.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args)} exited with {done.returncode}: "
                f"{done.stderr.strip()}\n{self.log_tail(10)}"
            )
        return done.stdout

    # -- internals ---------------------------------------------------------------------

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(1024).startswith(b"* OK")
        except OSError:
            return False

    def _prepare(self) -> None:
        for path in (self.root, self.root / "state", self.root / "mail", self.root / "home"):
            path.mkdir(parents=True, exist_ok=True)
        base_dir = self.base_dir
        base_dir.mkdir(parents=True, exist_ok=True)
        if not self.log_path.exists():
            self.log_path.touch()
        self.log_path.chmod(0o644)  # readable for debugging whoever runs the test
        passwd = self.root / "passwd"
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n")
        passwd.chmod(0o600)
        oauth2 = self.oauth2_config
        if self.oauth2_introspection_url is not None:
            url = self.oauth2_introspection_url
            if not re.fullmatch(r"https?://[^\s\"'\\#{}%]+", url):
                raise DovecotError(f"not a usable oauth2 introspection URL: {url!r}")
            oauth2.write_text(self._oauth2_config_text())
            oauth2.chmod(0o644)  # no secret in it; the auth process reads it as "dovecot"
        else:
            oauth2.unlink(missing_ok=True)
        if self.acl is not None:
            self.acl_path.write_text(self.acl)
            self.acl_path.chmod(0o644)  # read by the imap process, as the mail user
        for path in (self.root, base_dir):
            if re.search(r"[\s\"'\\#{}]", str(path)):
                raise DovecotError(f"Dovecot test dirs cannot contain spaces or quotes: {path}")
        if os.geteuid() == 0:
            for name in ("dovecot", "dovenull"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    raise DovecotError(f"user {name!r} missing. {INSTALL_HINT}") from None
            # The auth process (user dovecot) reads the passwords; mail is nobody's.
            os.chown(passwd, 0, pwd.getpwnam("dovecot").pw_gid)
            passwd.chmod(0o640)
            mail_user = pwd.getpwnam("nobody")
            for path in (self.root / "mail", self.root / "home"):
                os.chown(path, mail_user.pw_uid, mail_user.pw_gid)
            _make_traversable(self.root)
            _make_traversable(base_dir)
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        root = self.root
        tls = self.cert is not None and self.key is not None and self.tls_port is not None
        if os.geteuid() == 0:
            mail = pwd.getpwnam("nobody")  # Dovecot never accesses mail as root
            uid, gid = mail.pw_uid, mail.pw_gid
            users = f"""\
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
"""
            no_chroot = ""
        else:  # "rootless": every process runs as the current user, without chroot
            uid, gid = os.getuid(), os.getgid()
            users = f"""\
default_internal_user = {_user_name(uid)}
default_internal_group = {_group_name(gid)}
default_login_user = {_user_name(uid)}
first_valid_uid = 1
first_valid_gid = 0
"""
            no_chroot = "  chroot =\n"
        ssl_conf = (
            f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{self.key}\n" if tls else "ssl = no\n"
        )
        capability = f"imap_capability = {self.capability}\n" if self.capability else ""
        if self.oauth2_introspection_url is not None:
            # XOAUTH2 and OAUTHBEARER hand their token to every passdb as the password:
            # the passwd-file answers only PLAIN and LOGIN, the oauth2 passdb only those.
            mechanisms = "auth_mechanisms = plain login xoauth2 oauthbearer\n"
            passwd_mechanisms = "  mechanisms = plain login\n"
            oauth2_passdb = f"""\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_config}
}}
"""
        else:
            mechanisms = passwd_mechanisms = oauth2_passdb = ""
        if self.auth_delays:
            no_delays = penalty_listener = ""
        else:
            # The auth process looks for base_dir/anvil-auth-penalty and quietly
            # does without the penalty when it is missing (ENOENT is not logged).
            no_delays = "auth_failure_delay = 0\n"
            penalty_listener = """\
  unix_listener anvil-auth-penalty {
    path = anvil-auth-penalty-disabled-by-tests
  }
"""
        if self.acl is not None:
            acl_plugin = f"""\
mail_plugins = $mail_plugins acl
plugin {{
  acl = vfile:{self.acl_path}:cache_secs=0
}}
"""
            imap_plugins = "  mail_plugins = $mail_plugins imap_acl\n"
        else:
            acl_plugin = imap_plugins = ""
        return f"""\
# Written by tests/dovecot.py: a throwaway Dovecot on 127.0.0.1:{self.port}.
listen = 127.0.0.1
protocols = imap
instance_name = dovecot-test-{self.port}
base_dir = {self.base_dir}
state_dir = {root / "state"}
log_path = {self.log_path}
auth_verbose = yes
{users}
{ssl_conf}disable_plaintext_auth = no
{no_delays}{mechanisms}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root / "passwd"}
{passwd_mechanisms}}}
{oauth2_passdb}userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root / "home"}/%u
}}
mail_location = maildir:{root / "mail"}/%u
{acl_plugin}# The default 10 sessions per user and address: a test's slow proxy holds each
# upstream session until its trickle ends, and the test's own checks log in too.
protocol imap {{
  mail_max_userip_connections = 100
{imap_plugins}}}
namespace inbox {{
  inbox = yes
  prefix = {self.namespace[0]}
  separator = {self.namespace[1]}
}}
{capability}
service imap-login {{
  inet_listener imap {{
    port = {self.port}
  }}
  inet_listener imaps {{
    port = {self.tls_port if tls else 0}
    ssl = yes
  }}
{no_chroot}}}
service anvil {{
{penalty_listener}{no_chroot}}}
"""

    def _oauth2_config_text(self) -> str:
        # Dovecot 2.3's lib-oauth2 / passdb oauth2 settings (dovecot-oauth2.conf.ext).
        # Without tokeninfo_url and grant_url, every token goes to introspection_url;
        # introspection_mode = post sends "token=<token>" as a form body. The
        # username attribute of the reply must equal the login name (%u).
        return f"""\
# Written by tests/dovecot.py: tokens are checked by {self.oauth2_introspection_url}.
introspection_mode = post
introspection_url = {self.oauth2_introspection_url}
username_attribute = username
active_attribute = active
active_value = true
timeout_msecs = 5000
max_idle_time_msecs = 1000
"""


def start_dovecot(
    root: Path,
    *,
    tls: bool = False,
    without: Iterable[str] = (),
    user: str = "support@example.com",
    password: str = "imap-secret",
    certificate: tuple[Path, Path] | None = None,
    oauth2_introspection_url: str | None = None,
    auth_delays: bool = True,
    acl: str | None = None,
    namespace: tuple[str, str] = ("", "/"),
) -> Dovecot:
    """A started Dovecot under `root` (call `.stop()` when done).

    tls: also an implicit-TLS listener (`tls_port`) and STARTTLS on `port`, with a
    self-signed certificate for 127.0.0.1 made under root/tls (or the given
    (cert, key), e.g. the session `certificate` fixture).
    without: capabilities not to advertise, e.g. ("MOVE",) or ("IDLE",).
    oauth2_introspection_url: also SASL XOAUTH2 and OAUTHBEARER, the token checked by
    POSTing `token=<token>` to this URL (RFC 7662 introspection, JSON reply with
    "active" and "username"); the password keeps working for PLAIN and LOGIN.
    auth_delays=False: refused logins are answered at once and cost no penalty
    (by default, as installed, Dovecot slows down every login after a refused one).
    acl: a global ACL, e.g. "INBOX owner lrs" (see the module's docstring).
    namespace: the personal namespace's (prefix, separator), e.g. ("INBOX.", ".").
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    removed = {name.upper() for name in without}
    if removed & _ADDED_BY_DOVECOT:
        raise ValueError(
            f"{sorted(removed & _ADDED_BY_DOVECOT)} cannot be removed through imap_capability"
        )
    cert = key = None
    if tls:
        if certificate is None:
            (root / "tls").mkdir(exist_ok=True)
            certificate = make_certificate(root / "tls")
        cert, key = certificate
    server = Dovecot(root, port=0, user=user, password=password, cert=cert, key=key,
                     oauth2_introspection_url=oauth2_introspection_url,
                     auth_delays=auth_delays, acl=acl, namespace=namespace)  # fmt: skip
    for attempt in range(3):  # a free port can be taken before Dovecot binds it
        server.port = free_port()
        server.tls_port = None
        while tls and server.tls_port in (None, server.port):
            server.tls_port = free_port()
        try:
            if removed:
                server.capability = " ".join(_capabilities_without(server, removed))
            server.start()
            break
        except DovecotError:
            if attempt == 2 or "Address already in use" not in server.log_tail():
                raise
    if removed:
        advertised = {c.decode().upper() for c in _post_login_capabilities(server)}
        if advertised & removed:
            server.stop()
            raise DovecotError(f"Dovecot still advertises {sorted(advertised & removed)}")
    return server


def _capabilities_without(server: Dovecot, removed: set[str]) -> list[str]:
    global _default_capabilities
    if _default_capabilities is None:
        # Ask Dovecot itself once: start this very server with the defaults.
        server.capability = None
        server.start()
        try:
            _default_capabilities = tuple(c.decode() for c in _post_login_capabilities(server))
        finally:
            server.stop()
    unknown = removed - {c.upper() for c in _default_capabilities}
    if unknown:
        advertised = " ".join(_default_capabilities)
        raise ValueError(f"Dovecot does not advertise {sorted(unknown)} anyway: {advertised}")
    return [
        c
        for c in _default_capabilities
        if c.upper() not in removed and c.upper() not in _ADDED_BY_DOVECOT
    ]


def _post_login_capabilities(server: Dovecot) -> list[bytes]:
    """CAPABILITY after LOGIN, as the server words it (imaplib keeps the case)."""
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    try:
        conn.login(server.user, server.password)
        _, data = conn.capability()
        return data[0].split()
    finally:
        with contextlib.suppress(Exception):
            conn.logout()


def _appenduid(response: bytes) -> int:
    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", response)
    if match is None:
        raise DovecotError(f"no APPENDUID in the APPEND response: {response!r}")
    return int(match.group(1))


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _session(sid: int) -> list[int]:
    """The live processes of session `sid` (the master's: it is started in a new session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
                if int(fields[3]) == sid and fields[0] != "Z":  # state ppid pgrp session
                    pids.append(int(entry.name))
    return pids


def _process_name(pid: int) -> str:
    """Dovecot names its processes "<instance>/<service>" (e.g. dovecot-test-4321/imap)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise DovecotError(f"uid {uid} has no name; Dovecot needs one") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        raise DovecotError(f"gid {gid} has no name; Dovecot needs one") from None


def _make_traversable(path: Path) -> None:
    """o+x on `path` and its parents inside the temp dir (as root, for Dovecot's users).

    Only search permission is added, never read: nothing becomes listable. Above
    the temp dir nothing is changed; a parent there that others cannot enter is
    an error with a clear message.
    """
    tmp = Path(tempfile.gettempdir()).resolve()
    for directory in [path.resolve(), *path.resolve().parents]:
        mode = directory.stat().st_mode
        if mode & 0o001:
            continue
        if directory == tmp or tmp in directory.parents or directory == path.resolve():
            directory.chmod(mode | 0o001)
        else:
            raise DovecotError(
                f"{directory} is not searchable by others, so Dovecot's users cannot reach "
                f"{path}; use a directory under {tmp} (e.g. pytest's tmp_path)"
            )


@atexit.register
def _stop_forgotten() -> None:
    for server in list(_running.values()):
        with contextlib.suppress(Exception):
            server.stop()
