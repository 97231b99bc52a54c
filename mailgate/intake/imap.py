"""IMAP source: read a mailbox at a provider, each message exactly once.

A source only turns the mailbox into `(raw bytes, envelope)` and reports the
outcome back by moving the message; the pipeline decides. Exactly once:

- every message still in `folder` is fetched by UID (whatever its flags: a
  user marking mail \\Seen must not hide it), with BODY.PEEK so we set none;
- it is moved to `processed_folder` (or `failed_folder` when quarantined,
  too large or too slow to fetch) only after `process` committed it;
- a crash between the commit and the move leaves it in `folder`; fetched
  again, the pipeline recognises it (`duplicate`) and the move happens then.
  A changed UIDVALIDITY is the same case for every message: no bookkeeping
  of ours can double a ticket, the stored messages do that job.

Each mailbox runs in its own thread (imapclient is blocking), with its own
connection and backoff, so one failing mailbox never stops another or the
SMTP listener. One log line per state change, not per retry.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import random
import re
import shlex
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable

import imapclient
from imapclient.exceptions import IMAPClientError, LoginError
from sqlalchemy.exc import DBAPIError

from mailgate.app import App
from mailgate.config import ConfigError, ImapIntake, is_loopback, mailbox_name, read_secret
from mailgate.intake.faults import Fault
from mailgate.pipeline.message import Envelope
from mailgate.pipeline.process import TemporaryFailure, process
from mailgate.store.db import unavailable
from mailgate.store.state import get_state, set_state

log = logging.getLogger("mailgate.imap")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
# The header of a message held back (_hold): enough for its sender, subject and ids.
HEADER_BYTES = 65_536
FETCH_ATTEMPTS = 2  # a message whose fetch was cut this often goes to failed_folder
# A message the server failed to return this often in a row (a NO, a BYE, a dropped
# link) goes to failed_folder: fetched oldest first, it would hold back all later mail.
FETCH_FAILURES = 3
# Set with \\Deleted when filing without MOVE: marks the message as copied by us.
FILED = b"$MailgateFiled"
# Outcomes kept for an operator rather than filed as handled.
FAILED_OUTCOMES = frozenset({"quarantined"})


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds before reconnect attempt `attempt` (0-based): doubling, capped, with jitter."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
    return rng.uniform(ceiling / 2, ceiling)  # jitter: mailboxes of one provider do not stampede


def uidvalidity_key(name: str, folder: str) -> str:
    """The state key remembering the UIDVALIDITY of `folder` in mailbox `name`. The
    folder goes in as a digest: a folder name has no length limit and the key column holds
    200 characters (PostgreSQL refuses more, and the mailbox never started), and
    dots, allowed in both, must not make two mailboxes' folders one key."""
    digest = hashlib.sha256(mailbox_name(folder).encode()).hexdigest()
    return f"imap.{name}.uidvalidity.{digest}"


class CannotFile(Exception):
    """The watched folder lets us read mail but not move it out: nothing is taken
    from it, since every message would be stored and then left there."""


def read_only(selected: dict[bytes, object]) -> str | None:
    """Why mail cannot be moved out of the folder SELECT answered `selected` for;
    None when it can. RFC 4314 5.1.1: no \\Deleted in PERMANENTFLAGS without the
    right to delete (Dovecot's ACL, shared folders); RFC 3501: no PERMANENTFLAGS
    at all means every flag can be kept."""
    if selected.get(b"READ-ONLY"):
        return "the server opened it read-only"
    flags = selected.get(b"PERMANENTFLAGS")
    if isinstance(flags, tuple) and b"\\deleted" not in (bytes(f).lower() for f in flags):
        kept = " ".join(bytes(f).decode("ascii", "replace") for f in flags) or "none"
        return f"the server keeps no \\Deleted flag there (PERMANENTFLAGS: {kept})"
    return None


def on_server(name: str, prefix: str, delimiter: str | None) -> str:
    """A folder mailgate files into, written in settings with "/" between levels
    (mailgate/processed), as the server names it (RFC 2342): its own hierarchy
    delimiter (Dovecot's default for Maildir and Courier use ".", and refuse a "/"
    in a name), below its personal namespace prefix (Courier's "INBOX.")."""
    if delimiter and delimiter != "/":
        name = name.replace("/", delimiter)
    if prefix and mailbox_name(name) != "INBOX" and not name.upper().startswith(prefix.upper()):
        name = prefix + name
    return name


def personal_namespace(client: imapclient.IMAPClient) -> tuple[str, str | None]:
    """The prefix and hierarchy delimiter of the account's own folders."""
    if client.has_capability("NAMESPACE"):
        personal = client.namespace().personal
        if personal:
            prefix, delimiter = personal[0]
            return str(prefix or ""), (str(delimiter) if delimiter else None)
    # RFC 3501 6.3.8: LIST "" "" answers with the hierarchy delimiter alone.
    for _flags, delimiter, _name in client.list_folders("", ""):
        return "", (delimiter.decode() if isinstance(delimiter, bytes) else delimiter) or None
    return "", None


def destination(settings: ImapIntake, outcome: str, *, held: bool = False) -> str:
    """Where a message goes once stored: `held`, a copy of quarantined mail (fetched
    again after a crash and a changed UIDVALIDITY, say) joins the held mail."""
    if held or outcome in FAILED_OUTCOMES:
        return settings.failed_folder
    return settings.processed_folder


class Mailbox:
    """One IMAP mailbox, drained and watched by its own thread until `stop()`."""

    def __init__(
        self, app: Callable[[], App], settings: ImapIntake, fault: Fault | None = None
    ) -> None:
        self._app = app
        self.settings = settings
        self.fault = fault
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"imap-{settings.name}")
        self._state = ""
        self._bug = ""  # the last unexpected error, until a drain gets through
        self._drained = False  # this session got through a drain: it worked
        self._slow: dict[int, int] = {}  # uid -> fetches cut at fetch_timeout_seconds
        self._failed: dict[int, tuple[int, str]] = {}  # uid -> (failed fetches, last error)
        self._uidvalidity = 0  # of the folder, once selected
        self._filing = settings  # processed_folder and failed_folder as the server names them
        self._rng = random.Random()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._drained = False
            try:
                with self.connect() as client:
                    self._serve(client)
            except LoginError as exc:
                self._report(
                    "login refused", f"by {self.settings.host}: {error_text(exc)}", error=True
                )
            except ConfigError as exc:
                self._report("cannot log in", "; ".join(exc.problems), error=True)
            except CannotFile as exc:
                self._report("cannot file mail", str(exc), error=True)
            except (OSError, IMAPClientError, TemporaryFailure) as exc:
                self._report("disconnected", error_text(exc), error=True)
            except Exception as exc:  # noqa: BLE001 - the thread must survive to reconnect
                # Its traceback once: a bug met at each reconnect would otherwise
                # write one per backoff, for as long as it lasts.
                bug = f"{type(exc).__name__}: {exc}"
                if bug != self._bug:
                    log.exception("imap %s: unexpected error", self.settings.name)
                self._bug, self._state = bug, "unexpected error"
            # A login that works is not a session that works: a folder that does not
            # exist, a MOVE refused, fail right after it. Counted from the login, the
            # backoff then stayed at its first step: a login a second, for ever.
            if self._drained:
                attempt = 0
            if self._stop.wait(backoff(attempt, self._rng)):
                break
            attempt += 1
        self._report("stopped")

    def _report(self, state: str, detail: str = "", *, error: bool = False) -> None:
        """Log `state` when it changes; retries in the same state are quiet, whatever the why."""
        if state != self._state:
            self._state = state
            line = f"{state}: {detail}" if detail else state
            (log.warning if error else log.info)("imap %s: %s", self.settings.name, line)

    # -- connection --------------------------------------------------------------------

    def connect(self) -> imapclient.IMAPClient:
        """A logged-in client; LoginError or OSError say why not."""
        s = self.settings
        if s.tls == "none" and not (is_loopback(s.host) or s.allow_plaintext):
            raise ConfigError([f"intake.imap {s.name}: tls: none only to loopback "
                               "(set allow_plaintext: true to force it)"])  # fmt: skip
        # The token first: a slow refresh must not hold a connection open, and a
        # broken command is reported even while the server is unreachable.
        token = self._token() if s.oauth2_token_command else None
        context = ssl.create_default_context(cafile=self._ca_file())
        client = imapclient.IMAPClient(
            s.host, s.port, ssl=s.tls == "implicit", ssl_context=context,
            timeout=s.timeout_seconds,
        )  # fmt: skip
        try:
            if s.tls == "starttls":
                client.starttls(context)
            if token is not None:
                if not client.has_capability("AUTH=XOAUTH2"):
                    raise ConfigError([f"intake.imap {s.name}: {s.host} does not offer XOAUTH2; "
                                       "use a password instead"])  # fmt: skip
                client.oauth2_login(s.username, token)
            else:
                client.login(s.username, self._password())
        except BaseException:
            _close(client)
            raise
        return client

    def _ca_file(self) -> str | None:
        ca = self.settings.tls_ca_file
        return str(self._app().settings.path(ca)) if ca else None

    def _password(self) -> str:
        s = self.settings
        secret = read_secret(file=s.password_file, env=s.password_env,
                             settings=self._app().settings, key="intake.imap.password")  # fmt: skip
        if secret is None:
            raise ConfigError([f"intake.imap {s.name}: set password_file or password_env"])
        return secret

    def _token(self) -> str:
        where = f"intake.imap {self.settings.name}: oauth2_token_command"
        try:
            done = subprocess.run(shlex.split(self.settings.oauth2_token_command or ""),
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise ConfigError([f"{where} failed: {exc}"]) from None
        # Not the command line in the message: it may carry a client secret.
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ConfigError([f"{where} failed with status {done.returncode}: {why}"])
        token = done.stdout.strip()
        if not token:
            raise ConfigError([f"{where} printed no token"])
        return token

    # -- work ----------------------------------------------------------------------------

    def _serve(self, client: imapclient.IMAPClient) -> None:
        s = self.settings
        prefix, delimiter = personal_namespace(client)
        self._filing = s.model_copy(update={
            key: on_server(getattr(s, key), prefix, delimiter)
            for key in ("processed_folder", "failed_folder")
        })  # fmt: skip
        for key in ("processed_folder", "failed_folder"):
            # The settings check saw the names as written; a message moved into the
            # folder it was read from would be read, stored and moved again, for ever.
            named = getattr(self._filing, key)
            if mailbox_name(named) == mailbox_name(s.folder):
                raise CannotFile(f"{key} {getattr(s, key)} is {named} on {s.host}: the "
                                 "folder mailgate reads; give it a folder of its own")  # fmt: skip
        for folder in (self._filing.processed_folder, self._filing.failed_folder):
            if not client.folder_exists(folder):
                client.create_folder(folder)
        selected = select(client, s)
        self._uidvalidity = int(selected[b"UIDVALIDITY"])
        self._remember_uidvalidity(self._uidvalidity)
        self._report("connected", f"to {s.host}, watching {s.folder}")
        idle = s.idle and client.has_capability("IDLE")
        while not self._stop.is_set():
            # Mail that arrives during a drain is announced (EXISTS) in the replies to
            # our FETCHes, not again in IDLE: drain until a search finds nothing.
            while self.drain(client) and not self._stop.is_set():
                pass
            self._bug, self._drained = "", True
            if idle:
                self._idle(client)
            elif self._stop.wait(s.poll_seconds):
                return
            else:
                client.noop()

    def _remember_uidvalidity(self, uidvalidity: int) -> None:
        # Per folder: another `folder:` is another UID space, not a changed one.
        # The keys of earlier versions (imap.<name>.uidvalidity, of whichever folder
        # was watched then; imap.<name>.<folder>.uidvalidity) are not read: a key
        # not seen yet is recorded without a warning, so an upgrade says nothing.
        # Reading the folderless one could only warn wrongly when the folder changed
        # with the upgrade, for a warning that changes nothing: stored mail is
        # recognised by its content whatever the UIDs.
        key = uidvalidity_key(self.settings.name, self.settings.folder)
        try:
            with self._app().sessions.begin() as session:
                known = get_state(session, key)
                if known is not None and known != str(uidvalidity):
                    log.warning(
                        "imap %s: UIDVALIDITY of %s changed (%s -> %s): every message in it "
                        "is checked again; those already stored are recognised as duplicates",
                        self.settings.name, self.settings.folder, known, uidvalidity,
                    )  # fmt: skip
                set_state(session, key, str(uidvalidity))
        except DBAPIError as exc:
            # As process() says it: an outage to wait out, not a bug with a traceback.
            raise TemporaryFailure(unavailable(exc)) from exc

    def _idle(self, client: imapclient.IMAPClient) -> None:
        """Wait in IDLE until the server reports new mail, `idle_seconds` pass or we stop."""
        client.idle()
        waited = 0.0
        try:
            # Mail that arrived between our last SEARCH and the IDLE is announced
            # before the server's "+ idling"; imaplib files that EXISTS among its
            # untagged responses, where idle_check() never looks. It was then
            # noticed only when IDLE was renewed (idle_seconds later).
            pending = client._imap.untagged_responses  # noqa: SLF001 - see above
            if pending.pop("EXISTS", None) or pending.pop("RECENT", None):
                return
            while not self._stop.is_set() and waited < self.settings.idle_seconds:
                # Short checks so that stop() is noticed within a second.
                if any(r[1] in (b"EXISTS", b"RECENT") for r in client.idle_check(timeout=1)
                       if len(r) > 1):  # fmt: skip
                    return
                waited += 1
        finally:
            client.idle_done()

    def drain(self, client: imapclient.IMAPClient) -> int:
        """Process every message in the folder, oldest first; how many were filed."""
        filed = 0
        if not client.has_capability("MOVE"):
            self._expunge_our_leftovers(client)
        # Whatever the flags (\\Seen hides nothing), except mail someone else deleted.
        for uid in sorted(client.search(["NOT", "DELETED"])):
            if self._stop.is_set():
                break
            self._one(client, uid)
            filed += 1
        return filed

    def _one(self, client: imapclient.IMAPClient, uid: int) -> None:
        s = self.settings
        failures, error = self._failed.get(uid, (0, ""))
        if failures >= FETCH_FAILURES:
            why = f"the server failed to return it {FETCH_FAILURES} times (last: {error})"
            # Its header may be as unreadable as the rest: tried once, then done without.
            self._hold(client, uid, why, header=failures == FETCH_FAILURES)
            del self._failed[uid]
            return
        try:
            size = int(client.fetch([uid], ["RFC822.SIZE"]).get(uid, {}).get(b"RFC822.SIZE", 0))
        except (OSError, IMAPClientError) as exc:
            self._fetch_failed(uid, exc)
            raise
        if size > s.max_message_bytes:
            why = f"{size} bytes, over intake.imap.max_message_bytes ({s.max_message_bytes})"
            # An SMTP sender hears of this from their own server (our 552); here
            # the provider took the mail, so we tell a known sender ourselves.
            self._hold(client, uid, why, notice="too_large")
            return
        if self._slow.get(uid, 0) >= FETCH_ATTEMPTS:
            why = (f"its fetch took over fetch_timeout_seconds ({s.fetch_timeout_seconds} s) "
                   f"{FETCH_ATTEMPTS} times")  # fmt: skip
            self._hold(client, uid, why)
            del self._slow[uid]
            return
        raw = self._fetch(client, uid)
        if raw is None:
            return
        result = process(self._app(), raw, self._envelope(uid))
        if self.fault is not None:
            self.fault.reached("imap_after_commit", raw)
        self._file(client, uid, destination(self._filing, result.outcome, held=result.held))

    def _envelope(self, uid: int, held: str | None = None, notice: str | None = None) -> Envelope:
        s = self.settings
        return Envelope(
            source="imap",
            rcpt_to=(s.username,),
            trusted_authserv_ids=tuple(s.trusted_authserv_ids),
            mailbox_uid=f"{s.name}/{s.folder}/{self._uidvalidity}/{uid}",
            held=held,
            held_notice=notice,
        )

    def _hold(
        self,
        client: imapclient.IMAPClient,
        uid: int,
        why: str,
        notice: str | None = None,
        *,
        header: bool = True,
    ) -> None:
        """A message not fetched whole goes to failed_folder, and is recorded as
        quarantined with its header, so an operator finds it where held mail is
        listed (`mailgate quarantine list`), as an SMTP sender would hear of it.
        `header=False`: the server failed to return even that."""
        s = self._filing
        reason = f"not fetched: {why}; the original is in IMAP folder {s.failed_folder}"
        if header:
            try:
                fetched = client.fetch([uid], [f"BODY.PEEK[HEADER]<0.{HEADER_BYTES}>"]).get(uid)
            except (OSError, IMAPClientError) as exc:
                self._fetch_failed(uid, exc)
                raise
            if fetched is None:
                return  # expunged by someone else meanwhile
            top = next((bytes(v) for k, v in fetched.items() if k.startswith(b"BODY[HEADER]")), b"")
        else:
            # Where it was: without it, two such stand-ins would be one message.
            top = f"X-Mailgate-Imap-Uid: {self._envelope(uid).mailbox_uid}".encode()
        log.warning("imap %s: uid %s: %s: to %s", s.name, uid, why, s.failed_folder)
        stand_in = top.rstrip(b"\r\n") + f"\r\n\r\n[mailgate: {reason}]\r\n".encode()
        process(self._app(), stand_in, self._envelope(uid, held=reason, notice=notice))
        self._file(client, uid, s.failed_folder)

    def _fetch(self, client: imapclient.IMAPClient, uid: int) -> bytes | None:
        # The socket timeout only bounds each read: a server trickling bytes would
        # hold the mailbox forever. The whole fetch gets fetch_timeout_seconds; then
        # the connection is cut, and after the reconnect this UID is tried again,
        # until it has been cut FETCH_ATTEMPTS times and goes to failed_folder.
        # The cut is recorded before the socket is shut: the fetch fails at once, while
        # the timer thread may still be alive, so is_alive() would not tell.
        cut = threading.Event()
        deadline = threading.Timer(self.settings.fetch_timeout_seconds, _cut, args=(client, cut))
        deadline.start()
        try:
            data = client.fetch([uid], ["BODY.PEEK[]"])
        except (OSError, IMAPClientError) as exc:
            if cut.is_set():
                self._slow[uid] = self._slow.get(uid, 0) + 1
            else:
                self._fetch_failed(uid, exc)
            raise
        finally:
            deadline.cancel()
        body = data.get(uid, {}).get(b"BODY[]")
        if body is None:
            return None  # expunged by someone else meanwhile
        self._slow.pop(uid, None)
        self._failed.pop(uid, None)
        return bytes(body)

    def _fetch_failed(self, uid: int, exc: BaseException) -> None:
        failures, _ = self._failed.get(uid, (0, ""))
        self._failed[uid] = (failures + 1, error_text(exc))

    def _file(self, client: imapclient.IMAPClient, uid: int, folder: str) -> None:
        if client.has_capability("MOVE"):
            client.move([uid], folder)
        else:
            client.copy([uid], folder)
            client.add_flags([uid], [imapclient.DELETED, FILED])
            self._expunge(client, [uid])

    def _expunge_our_leftovers(self, client: imapclient.IMAPClient) -> None:
        """Without MOVE, a link cut between our STORE \\Deleted and our EXPUNGE leaves a
        message that is filed (copied) but still here, skipped by every search: ours
        carry FILED, so they are told from mail someone else deleted, and expunged."""
        leftovers = client.search(["DELETED", "KEYWORD", FILED.decode()])
        # Said only once they are gone: while another client's \\Deleted mail holds
        # them back, every drain finds them again, and the warning said why already.
        # A state of its own, so that the next such wait is a change, warned again.
        if leftovers and self._expunge(client, leftovers):
            self._report("filed mail expunged", f"{len(leftovers)} message(s) left in "
                         f"{self.settings.folder} after they were filed")  # fmt: skip

    def _expunge(self, client: imapclient.IMAPClient, uids: list[int]) -> bool:
        """Expunge our filed `uids`, never someone else's \\Deleted mail; False when
        they have to wait. UID EXPUNGE (UIDPLUS) names them; a server without it
        only knows EXPUNGE, which removes every \\Deleted message: sent only while
        all of them are ours. Otherwise ours stay, flagged and skipped, until a
        later drain finds the folder clear."""
        if client.has_capability("UIDPLUS"):
            client.expunge(uids)
            return True
        theirs = client.search(["DELETED", "NOT", "KEYWORD", FILED.decode()])
        if not theirs:
            # A message flagged \\Deleted by someone else between this search and
            # the EXPUNGE goes too: without UIDPLUS, IMAP offers nothing narrower.
            client.expunge()
            return True
        s = self.settings
        self._report(
            "filed mail left in the folder",
            f"{s.folder} holds {len(theirs)} message(s) another client deleted and did not "
            f"expunge, and {s.host} has no UIDPLUS, so an EXPUNGE would remove them too; "
            f"ours stay flagged {FILED.decode()} until they are gone",
            error=True,
        )
        return False


def select(client: imapclient.IMAPClient, settings: ImapIntake) -> dict[bytes, object]:
    """SELECT the watched folder; CannotFile when its mail could not be moved out."""
    selected = client.select_folder(settings.folder)
    why = read_only(selected)
    if why is not None:
        raise CannotFile(
            f"{settings.folder} is read-only for {settings.username}: {why}; each message "
            f"is moved out once stored, so none is taken. Let the account delete and "
            f"expunge there (IMAP ACL rights t and e)"
        )
    return selected


def _cut(client: imapclient.IMAPClient, cut: threading.Event) -> None:
    cut.set()
    with contextlib.suppress(OSError):
        client.socket().shutdown(socket.SHUT_RDWR)


def _close(client: imapclient.IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - closing a broken connection
        with contextlib.suppress(Exception):
            client.shutdown()


def error_text(exc: BaseException) -> str:
    """An error as an operator reads it. imaplib's carry the server's reply as bytes,
    and imapclient passes on str() of them: b'[AUTHENTICATIONFAILED] ...'."""
    text = str(exc).strip()
    if re.fullmatch(r"b(['\"]).*\1", text, re.DOTALL):
        with contextlib.suppress(ValueError, SyntaxError):
            text = ast.literal_eval(text).decode("utf-8", "replace").strip()
    return text or type(exc).__name__
