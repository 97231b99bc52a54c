"""`mailgate run`: one asyncio process hosting every long-running part.

- the SMTP listener (mailgate.intake.smtp), when enabled;
- the outbox sender, woken as soon as a commit queued mail and on a timer;
- APScheduler for the periodic jobs (outbox retry, housekeeping);
- leadership (mailgate.store.leadership): with several instances on one
  database, only the leader polls IMAP and runs the lifecycle, SLA, credit
  and retention jobs; the others take over within LEADERSHIP_SECONDS of its death;
- systemd integration: READY=1 once listening, WATCHDOG=1 from the event
  loop (a stuck loop gets the service restarted), STOPPING=1, STATUS.

Signals: SIGTERM/SIGINT stop gracefully (no new sessions, messages being
processed may finish within `shutdown_grace_seconds`); SIGHUP re-reads the
settings, the directory and the templates, and keeps the running ones when
any of them is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from mailgate import systemd_notify
from mailgate.app import App
from mailgate.checks import sqlite_file_problems
from mailgate.config import ConfigError, Settings, config_path, load_settings
from mailgate.credits.billing import sweep as credits_sweep
from mailgate.directory import sync_directory_if_changed
from mailgate.intake.faults import Fault
from mailgate.intake.imap import Mailbox
from mailgate.intake.smtp import SmtpListener, listen_problem
from mailgate.intake.smtp_files import file_problems as smtp_file_problems
from mailgate.observability import Metrics, set_log_key
from mailgate.outbound.outbox import next_attempt
from mailgate.privacy.retention import run as retention_run
from mailgate.sla.sweep import sweep as sla_sweep
from mailgate.store.db import unavailable
from mailgate.store.leadership import Leadership, leadership_for
from mailgate.store.models import OutboxMail
from mailgate.tickets.sweep import sweep

log = logging.getLogger("mailgate.daemon")

OUTBOX_RETRY_SECONDS = 30  # due retries are found at most this late
HOUSEKEEPING_SECONDS = 60  # outbox gauges and the systemd status line
LIFECYCLE_SECONDS = 300  # reminders, automatic resolution and closing: day-scale deadlines
CREDITS_SECONDS = 3600  # credit expiries and their notices: day-scale dates
LEADERSHIP_SECONDS = 5  # how often a standby instance asks to lead: the takeover delay
RETENTION_SECONDS = 3600  # retention periods are counted in days
LEADER_JOBS = ("lifecycle", "credits", "sla", "retention")  # run by the leader only


class OutboxSender:
    """Sends due mail in one worker thread; `poke` wakes it from any thread."""

    def __init__(
        self, app: Callable[[], App], loop: asyncio.AbstractEventLoop, fault: Fault | None = None
    ) -> None:
        self._app = app
        self._loop = loop
        self._fault = fault
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._stopping = False

    def poke(self) -> None:
        self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self._loop.run_in_executor(self._pool, self._send_all_due)
            except DBAPIError as exc:  # down or restarting: an operator sees one line
                log.warning("outbox round: %s; retrying at the next wake-up", unavailable(exc))
            except Exception:  # noqa: BLE001 - the sender must outlive one bad round
                log.exception("outbox round failed; retrying at the next wake-up")

    def _after_send(self, data: bytes) -> None:
        assert self._fault is not None
        self._fault.reached("after_send_before_mark", data)

    def _send_all_due(self) -> None:
        app = self._app()
        app.send_outbox(self._after_send if self._fault is not None else None)
        # Wake again when the next retry falls due, not at the next periodic poke:
        # a relay back up after a short outage gets its backlog within seconds.
        with app.sessions() as session:
            due = next_attempt(session)
        if due is not None:
            delay = (due - app.clock()).total_seconds()
            if delay < OUTBOX_RETRY_SECONDS:
                self._loop.call_soon_threadsafe(self._loop.call_later, max(delay, 0.1), self.poke)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._pool.shutdown(wait=True)  # a send in progress finishes and is recorded


class Daemon:
    def __init__(self, settings_file: Path) -> None:
        self.settings_file = settings_file
        self.app: App | None = None
        self.listener: SmtpListener | None = None
        self.stop_requested = asyncio.Event()
        self.metrics: Metrics | None = None
        self.leadership: Leadership | None = None
        self.leading = False
        self.mailboxes: list[Mailbox] = []
        self.fault: Fault | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.running: set[asyncio.Future[None]] = set()  # scheduled jobs running now
        self.reloading = asyncio.Lock()

    def current_app(self) -> App:
        assert self.app is not None
        return self.app

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.app = build_app(load_settings(self.settings_file))
        self.fault = fault = Fault.from_env()  # tests only: a crash point on demand
        sender = OutboxSender(self.current_app, loop, fault)
        self.app.on_outbox.append(sender.poke)
        settings = self.app.settings

        tasks = [asyncio.create_task(sender.run(), name="outbox")]
        if settings.intake.smtp.enabled:
            self.listener = SmtpListener(
                self.current_app, settings.intake.smtp, settings.base_dir, fault
            )
            for host, port in await self.listener.start():  # a port taken: ConfigError
                log.info("SMTP listening on %s:%d", host, port)
        # Before leading: a metrics port taken stops the start before any mailbox is polled.
        self.metrics = _start_metrics(settings)
        self.leadership = leadership_for(self.app.engine)
        await self.check_leadership()  # a lone instance leads before its first sweep
        self.scheduler = scheduler = AsyncIOScheduler(event_loop=loop)
        scheduler.add_job(sender.poke, "interval", seconds=OUTBOX_RETRY_SECONDS, id="outbox")
        scheduler.add_job(
            self._shielded,
            "interval",
            args=(self.housekeeping,),
            id="housekeeping",
            seconds=HOUSEKEEPING_SECONDS,
            next_run_time=datetime.now(UTC),  # a first status line right away
        )
        scheduler.add_job(self._shielded, "interval", args=(self.check_leadership,),
                          id="leadership", seconds=LEADERSHIP_SECONDS)  # fmt: skip
        self._schedule_sweeps(settings)
        scheduler.start()
        if (interval := systemd_notify.watchdog_interval()) is not None:
            tasks.append(asyncio.create_task(_watchdog(interval), name="watchdog"))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(sender)))

        sender.poke()  # mail queued while we were down
        systemd_notify.ready("serving")
        log.info("mailgate running (settings %s)", self.settings_file)
        await self.stop_requested.wait()

        systemd_notify.stopping("stopping")
        log.info("stopping: finishing messages in progress")
        scheduler.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.stop()
        if self.listener is not None:
            await self.listener.stop(settings.intake.smtp.shutdown_grace_seconds)
        await asyncio.gather(*self.running)  # work in progress, before stepping down
        await self.step_down()
        await sender.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.current_app().engine.dispose()
        log.info("stopped")
        return 0

    async def reload(self, sender: OutboxSender) -> None:
        """SIGHUP: new settings, directory and templates, or the old ones if any is broken."""
        async with self.reloading:  # a second SIGHUP meanwhile reloads after this one
            await self._reload(sender)

    async def _reload(self, sender: OutboxSender) -> None:
        systemd_notify.reloading()
        old = self.current_app()
        refused = "reload refused, still running the previous configuration"
        app: App | None = None
        try:
            # In a thread: the directory sync writes to the database, which may
            # be busy (a writer held, PostgreSQL restarting); on the event loop
            # every SMTP session and the watchdog stood still meanwhile.
            app = await asyncio.to_thread(_load_app, self.settings_file, old)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("%s: %s", refused, line)
        except DBAPIError as exc:  # passing: one line, and what to do about it
            log.error("%s: %s; send SIGHUP again once it is available", refused, unavailable(exc))
        except Exception:  # whatever it was, the old configuration keeps serving
            log.exception(refused)
        if app is None:
            # systemd must hear READY again, or it waits for a reload that never ends.
            systemd_notify.ready("serving (last reload refused)")
            return
        app.on_outbox.append(sender.poke)
        for part in ("smtp", "imap"):
            if getattr(app.settings.intake, part) != getattr(old.settings.intake, part):
                log.warning("intake.%s changed: it keeps its settings until a restart", part)
        self.app = app
        log.info("reloaded settings, directory and templates")
        if changed := self._schedule_sweeps(app.settings):
            log.info("sweeps: %s", ", ".join(changed))
        systemd_notify.ready("serving")

    def _schedule_sweeps(self, settings: Settings) -> list[str]:
        """Add, reschedule or remove the leader's jobs as `settings` say (at start
        and on reload); what changed. Read once at start, `retention.enabled:
        false` needed a restart: the hourly run went on deleting after a reload.
        A job added runs at once (at start: what fell due while we were down),
        then on its interval; a slow run is never run twice at once."""
        assert self.scheduler is not None
        changed = []
        for job, enabled, seconds, run in (
            ("lifecycle", True, LIFECYCLE_SECONDS, sweep),
            ("credits", settings.credits.enabled, CREDITS_SECONDS, credits_sweep),
            ("retention", settings.retention.enabled, RETENTION_SECONDS, retention_run),
            ("sla", settings.sla.enabled, settings.sla.sweep_seconds, sla_sweep),
        ):
            current = self.scheduler.get_job(job)
            if not enabled:
                if current is not None:
                    current.remove()  # a run in progress finishes
                    changed.append(f"{job} off")
            elif current is None:
                self.scheduler.add_job(self._shielded, "interval", args=(self._sweep, job, run),
                                       id=job, seconds=seconds, next_run_time=datetime.now(UTC),
                                       max_instances=1, coalesce=True)  # fmt: skip
                changed.append(f"{job} every {seconds} s")
            elif current.trigger.interval != timedelta(seconds=seconds):
                current.reschedule("interval", seconds=seconds)
                changed.append(f"{job} every {seconds} s")
        return changed

    async def check_leadership(self) -> None:
        """Take the lead when it is free, or notice that we lost it."""
        assert self.leadership is not None
        leading = await asyncio.to_thread(self.leadership.acquire)
        if leading and not self.leading:
            self.leading = True
            log.info("leading: this instance polls IMAP and runs the scheduled sweeps")
            settings = self.current_app().settings
            self.mailboxes = [
                Mailbox(self.current_app, box, self.fault) for box in settings.intake.mailboxes
            ]
            for mailbox in self.mailboxes:
                mailbox.start()
            if self.scheduler is not None:  # a takeover: what fell due meanwhile, now
                for job in LEADER_JOBS:
                    if self.scheduler.get_job(job) is not None:
                        self.scheduler.modify_job(job, next_run_time=datetime.now(UTC))
        elif not leading and self.leading:
            log.warning("no longer leading: IMAP polling and sweeps stop here")
            await self.step_down()

    async def step_down(self) -> None:
        self.leading = False
        # A mailbox finishes the message in hand (its move included) and logs out.
        await asyncio.gather(*(asyncio.to_thread(m.stop) for m in self.mailboxes))
        self.mailboxes = []
        if self.leadership is not None:
            await asyncio.to_thread(self.leadership.release)

    async def _sweep(self, name: str, job: Callable[[App, datetime], object]) -> None:
        if not self.leading:
            return
        app = self.current_app()
        log.debug("%s sweep starting", name)
        try:
            await asyncio.to_thread(job, app, app.clock())
        except DBAPIError as exc:
            log.warning("%s sweep: %s; the next run retries", name, unavailable(exc))
        except Exception:  # noqa: BLE001 - logged; the next run retries, the daemon serves on
            log.exception("%s sweep failed", name)
        log.debug("%s sweep done", name)

    async def _shielded(self, job: Callable[..., Awaitable[None]], *args: object) -> None:
        """A scheduled job that the scheduler's shutdown cannot interrupt. The
        shutdown cancels the jobs that are running, but the thread a job waits
        for (a sweep's transaction, a database read) cannot be stopped halfway:
        cancelled, the job went on in its thread and the log got a traceback.
        The daemon's stop waits for these jobs instead."""
        run = asyncio.ensure_future(job(*args))
        self.running.add(run)
        run.add_done_callback(self.running.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(run)

    async def housekeeping(self) -> None:
        app = self.current_app()

        def depth() -> int:
            with app.sessions() as session:
                if self.metrics is not None:
                    self.metrics.refresh(session, app.clock())
                due = OutboxMail.status.in_(("queued", "sending"))
                return session.scalar(select(func.count()).where(due)) or 0

        try:
            queued = await asyncio.get_running_loop().run_in_executor(None, depth)
        except DBAPIError as exc:
            log.warning("housekeeping: %s", unavailable(exc))
            systemd_notify.status(f"serving; {unavailable(exc)}")
            return
        systemd_notify.status(self.status_line(queued))

    def status_line(self, queued: int) -> str:
        """`serving (leader); 12 message(s) via SMTP (10 created, 2 rejected); 0 mail(s) queued`."""
        outcomes = self.listener.runner.outcomes if self.listener else {}
        detail = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        total = sum(outcomes.values())
        return (
            f"serving ({'leader' if self.leading else 'standby'}); {total} message(s) via SMTP"
            + (f" ({detail})" if detail else "")
            + f"; {queued} mail(s) queued"
        )


def _load_app(settings_file: Path, reuse: App) -> App:
    return build_app(load_settings(settings_file), reuse=reuse)


def build_app(settings: Settings, reuse: App | None = None) -> App:
    """An App whose templates render and whose directory is synced, or ConfigError."""
    app = App(settings)
    log_key = app.log_key  # read now: an unreadable secret is the first thing to say
    if reuse is not None and reuse.settings.database_url == settings.database_url:
        app.engine = reuse.engine  # type: ignore[misc] - keep the pool across reloads
    # A database it cannot write would have every mail answered 451, in silence.
    problems = sqlite_file_problems(settings) + app.templates.check()
    try:
        app.rules  # noqa: B018 - loaded now, so a broken file refuses the reload
    except ConfigError as exc:
        problems = exc.problems + problems
    if problems:
        raise ConfigError(problems)
    sync_directory_if_changed(app)
    # The listener's certificate, key and AUTH users, read now: a start stops with
    # one line naming the key, and a reload that would not survive a restart is refused.
    if problems := smtp_file_problems(settings):
        raise ConfigError(problems)
    set_log_key(log_key)  # only now: a refused reload keeps the running key's hashes
    return app


def _start_metrics(settings: Settings) -> Metrics | None:
    """The Prometheus endpoint, when enabled; counters are fed from the log records."""
    if not settings.metrics.enabled:
        return None
    metrics = Metrics()
    host, port = settings.metrics.host, settings.metrics.port
    try:
        port = metrics.start(host, port)
    except OSError as exc:  # the port taken: one line and exit 78, as for a bad setting
        problem = listen_problem(settings.source, "metrics.port", host, port, exc)
        raise ConfigError([problem]) from None
    logging.getLogger("mailgate").addHandler(metrics.log_handler())
    log.info("metrics on http://%s:%d/metrics", settings.metrics.host, port)
    return metrics


async def _watchdog(interval: float) -> None:
    while True:
        systemd_notify.watchdog()
        await asyncio.sleep(interval)


def cmd_run(args: argparse.Namespace) -> int:
    logging.getLogger("mailgate").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return asyncio.run(Daemon(config_path(args.config)).run())
