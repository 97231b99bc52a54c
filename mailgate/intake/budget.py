"""How much mail the SMTP listener holds in memory at once.

A message costs several times its size while it is received (aiosmtpd keeps
its lines, then joins them) and parsed (the standard library's parser peaks
near eight times the size of a large message). Ten senders of 25 MB
messages at once would need gigabytes. So a session reserves its message's
cost from a budget before we answer `354` to DATA, and gives it back after
the reply: large messages take turns while small ones go on in parallel.
The client waits for `354` meanwhile (RFC 5321 gives it 2 minutes).

The cost is known in advance from the ESMTP SIZE the client declares at MAIL
(Postfix, Exim, Exchange and Python's smtplib do), and the declaration is held
to: a message that runs well past it is cut off with 552 (RFC 1870 6.1), or
`SIZE=1` would reserve nothing and then send 25 MB. A client that declares
nothing (swaks, a scanner's scan-to-mail) may send up to `max_message_bytes`,
so that is what it reserves: such clients are few, and they take their turn.
A message whose cost exceeds the whole budget goes alone.
"""

from __future__ import annotations

import asyncio

# Receiving (about 2.5x) plus parsing (about 8x): measured on 25 MB messages.
COST_PER_BYTE = 10
# SIZE is the client's estimate (some count bare LF line ends, before CRLF and
# dot-stuffing add to it): a message may run this far past it.
DECLARED_SLACK_RATIO = 0.25
DECLARED_SLACK_BYTES = 64 * 1024


def declared_size(mail_options: list[str]) -> int | None:
    for option in mail_options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdecimal():  # not "²": see declared_size_readable
            return int(value)
    return None


def allowed_bytes(declared: int | None, max_bytes: int) -> int:
    """The most a message may send: its declared SIZE with some slack, or the whole
    limit when it declared none."""
    if declared is None:
        return max_bytes
    slack = int(declared * DECLARED_SLACK_RATIO) + DECLARED_SLACK_BYTES
    return min(max_bytes, declared + slack)


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._changed = asyncio.Condition()

    def cost(self, size: int) -> int:
        """What a message of at most `size` bytes reserves."""
        return min(size * COST_PER_BYTE, self.limit)

    async def reserve(self, cost: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + cost <= self.limit)
            self.used += cost

    async def release(self, cost: int) -> None:
        async with self._changed:
            self.used -= cost
            self._changed.notify_all()
