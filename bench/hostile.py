"""What does a hostile shape cost the parser, next to an ordinary mail? Measured in one run.

    .venv/bin/python bench/hostile.py [--repeat 5] [--stdlib] [--json]

Each shape of RELIABILITY §5 (and checklist 28/29) is built by the same code
as tests/test_hostile.py and given to `parse_message` with the shipped limits
(settings.yaml `hygiene.limits`): nesting 100 and 1,000 deep, 5,000 parts, a
100 KB header, 20,000 To addresses, a 210 KB subject and 300 attachments,
against a normal 10 KB mail. Time is the median of REPEAT runs; peak is the
largest Python allocation during one parse (tracemalloc), over what was
allocated before it. The target: every shape decided (parsed or refused) in
well under the 2 s budget and within a small multiple of the baseline.

`--stdlib` adds what the stdlib parser alone (policy.default, the parser
without a pre-scan) takes on the same bytes, for contrast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email import policy
from email.parser import BytesParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgate.config import Limits as LimitSettings  # noqa: E402
from mailgate.pipeline.message import ParseError  # noqa: E402
from mailgate.pipeline.parse import Limits, limits_from, parse_message  # noqa: E402
from tests.test_hostile import (  # noqa: E402
    big_header_mail,
    long_subject_mail,
    many_attachments_mail,
    many_parts_mail,
    many_to_mail,
    nested_mail,
    normal_mail,
)

SHAPES: dict[str, Callable[[], bytes]] = {
    "normal 10 KB (baseline)": normal_mail,
    "nesting 100": lambda: nested_mail(100),
    "nesting 1000": lambda: nested_mail(1000),
    "5000 parts": lambda: many_parts_mail(5000),
    "100 KB header": lambda: big_header_mail(100_000),
    "20000 To": lambda: many_to_mail(20_000),
    "210 KB subject": lambda: long_subject_mail(210_000),
    "300 attachments": lambda: many_attachments_mail(300),
}


@dataclass
class Row:
    shape: str
    bytes: int
    outcome: str
    ms: float
    peak_kb: float
    time_ratio: float = 0.0
    peak_ratio: float = 0.0
    stdlib_ms: float | None = None


def decide(raw: bytes, limits: Limits) -> str:
    try:
        parse_message(raw, limits)
    except ParseError as exc:
        return f"refused: {exc}"
    return "parsed"


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def peak_kb(run: Callable[[], object]) -> float:
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - base) / 1024


def stdlib_ms(raw: bytes) -> float:
    parser = BytesParser(policy=policy.default)
    started = time.perf_counter()
    try:
        msg = parser.parsebytes(raw)
        for part in msg.walk():  # what reading it costs: every header, every part
            list(part.items())
    except RecursionError:
        pass
    return (time.perf_counter() - started) * 1000


def measure(repeat: int, with_stdlib: bool) -> list[Row]:
    limits = limits_from(LimitSettings())  # the shipped defaults
    rows = []
    for name, build in SHAPES.items():
        raw = build()
        outcome = decide(raw, limits)
        ms = median_ms(lambda raw=raw: decide(raw, limits), repeat)
        peak = peak_kb(lambda raw=raw: decide(raw, limits))
        row = Row(name, len(raw), outcome, round(ms, 2), round(peak, 1))
        if with_stdlib:
            row.stdlib_ms = round(stdlib_ms(raw), 1)
        rows.append(row)
    baseline = rows[0]
    for row in rows:
        row.time_ratio = round(row.ms / baseline.ms, 1)
        row.peak_ratio = round(row.peak_kb / baseline.peak_kb, 1)
    return rows


def print_table(rows: list[Row]) -> None:
    stdlib = rows[0].stdlib_ms is not None
    header = f"{'shape':<24}{'bytes':>10}{'ms':>9}{'x base':>8}{'peak KB':>10}{'x base':>8}"
    print(header + (f"{'stdlib ms':>11}" if stdlib else "") + "  outcome")
    for r in rows:
        line = (
            f"{r.shape:<24}{r.bytes:>10}{r.ms:>9.2f}{r.time_ratio:>8.1f}"
            f"{r.peak_kb:>10.1f}{r.peak_ratio:>8.1f}"
        )
        if stdlib:
            line += f"{r.stdlib_ms:>11.1f}"
        print(line + "  " + r.outcome[:90])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per shape (median)")
    parser.add_argument("--stdlib", action="store_true", help="also time the bare stdlib parser")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows = measure(args.repeat, args.stdlib)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
