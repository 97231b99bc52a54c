"""Does an SLA sweep cost what is due, or what is open? Measured in one run.

    .venv/bin/python bench/sla.py [--due 1000] [--large 100000] [--small 1000] [--json]

Two databases (SQLite, the shipped settings and calendars): one with LARGE
open tickets of which DUE have a reminder due, one with SMALL open tickets and
the same DUE due. One sweep over each sends DUE reminders (rendered, queued in
the outbox). The target: the large sweep takes less than twice the small one,
because the sweep reads `sla_clocks` through the index on `next_alert_at`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from sqlalchemy import insert, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgate.app import App  # noqa: E402
from mailgate.config import load_settings  # noqa: E402
from mailgate.directory import sync_directory_if_changed  # noqa: E402
from mailgate.sla.sweep import sweep  # noqa: E402
from mailgate.store.models import Organisation, SlaClock, Ticket  # noqa: E402

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)  # a Tuesday, in business hours
CHUNK = 5000


def install(root: Path) -> App:
    settings = yaml.safe_load((ROOT / "settings.yaml").read_text())
    settings.update(
        templates_dir=str(ROOT / "templates"),
        rules_dir=str(ROOT / "rules"),
        directory=str(ROOT / "directory.yaml"),
    )
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    app = App(load_settings(root / "settings.yaml"))
    sync_directory_if_changed(app)
    return app


def fill(app: App, total: int, due: int) -> None:
    """`total` open tickets with a running resolution clock; `due` of them at 50 % now."""
    with app.sessions.begin() as session:
        org = session.scalar(select(Organisation.id).where(Organisation.id == "acme"))
        assert org is not None
    # Monday 11:00 Brussels: 9 business hours ago, past half of a 16 h target
    created = NOW - timedelta(days=1)
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        with app.sessions.begin() as session:
            first_id = (session.scalar(select(Ticket.id).order_by(Ticket.id.desc())) or 0) + 1
            session.execute(
                insert(Ticket),
                [
                    {
                        "number": f"SUP-2026-{n:07d}",
                        "organisation_id": "acme",
                        "subject": f"Ticket {n}",
                        "status": "open",
                        "priority": "P1",
                        "language": "fr",
                        "created_at": created,
                        "updated_at": created,
                    }
                    for n in range(start, stop)
                ],
            )
            session.execute(
                insert(SlaClock),
                [
                    {
                        "ticket_id": first_id + i,
                        "kind": "resolution",
                        "calendar": "business",
                        "target_seconds": 16 * 3600,
                        "started_at": created,
                        "due_at": created + timedelta(days=2),
                        "paused_seconds": 0,
                        "alerts_sent": 0,
                        # the due ones spread over the last hour, the others later this week
                        "next_alert_at": NOW - timedelta(seconds=(n % 3600) + 1)
                        if n < due
                        else NOW + timedelta(hours=1 + n % 72),
                    }
                    for i, n in enumerate(range(start, stop))
                ],
            )


def one_sweep(total: int, due: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-sla-") as tmp:
        app = install(Path(tmp))
        fill(app, total, due)
        started = time.perf_counter()
        report = sweep(app, NOW)
        seconds = time.perf_counter() - started
        app.engine.dispose()
    sent = report.reminders + report.breaches
    assert sent == due, f"expected {due} alerts, the sweep sent {sent}"
    return {"open": total, "due": due, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--due", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    small = one_sweep(args.small, args.due)
    large = one_sweep(args.large, args.due)
    ratio = large["seconds"] / small["seconds"]
    result = {"small": small, "large": large, "ratio": ratio, "target": "< 2"}
    if args.json:
        print(json.dumps(result))
    else:
        for row in (small, large):
            print(
                f"sweep over {row['open']:>7} open tickets, {row['due']} due: "
                f"{row['seconds'] * 1000:8.1f} ms ({row['due'] / row['seconds']:.0f} alerts/s)"
            )
        print(f"ratio large/small: {ratio:.2f} (target < 2)")
    return 0 if ratio < 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
