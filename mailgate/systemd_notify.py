"""sd_notify(3) for `Type=notify` services, without libsystemd.

The protocol is one datagram of newline-separated `KEY=value` lines sent to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading `@` means the abstract
namespace). Outside systemd the variable is unset and every call is a no-op,
so the daemon can call these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("mailgate.systemd")


def notify(*states: str) -> bool:
    """Send states such as "READY=1" or "STATUS=…"; True when a socket received them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    payload = "\n".join(state.replace("\n", " ") for state in states).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        # systemd gone or the socket full: the service must keep running regardless.
        log.debug("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # The start of this reload, as `Type=notify-reload` (systemd 253) requires:
    # without it systemd ignores RELOADING=1 and times the reload out.
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd asked for none.

    Half the configured timeout, as sd_watchdog_enabled(3) recommends, so a
    single late ping does not get the service killed.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (we were started by the service's main)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
