"""How much mail the SMTP listener holds in memory at once.

A message costs several times its size while it is received (aiosmtpd keeps
its lines, then joins them) and parsed (the standard library's parser peaks
near eight times the size of a large message). Ten senders of 25 MB
messages at once would need gigabytes. So a session reserves its message's
cost from a budget before we answer `354` to DATA, and gives it back after
the reply: large messages take turns while small ones go on in parallel.
The client waits for `354` meanwhile (RFC 5321 gives it 2 minutes).

The cost is known in advance from the ESMTP SIZE the client declares at MAIL
(Postfix and other MTAs do); without one, a modest size is assumed, and
`max_message_bytes` still bounds what is received. A message whose cost
exceeds the whole budget goes alone.
"""

from __future__ import annotations

import asyncio

# Receiving (about 2.5x) plus parsing (about 8x): measured on 25 MB messages.
COST_PER_BYTE = 10
UNDECLARED_BYTES = 1_000_000  # what a message without SIZE= is assumed to weigh


def declared_size(mail_options: list[str]) -> int | None:
    for option in mail_options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdecimal():  # not "²": see declared_size_readable
            return int(value)
    return None


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._changed = asyncio.Condition()

    def cost(self, declared: int | None) -> int:
        size = declared if declared is not None else UNDECLARED_BYTES
        return min(size * COST_PER_BYTE, self.limit)

    async def reserve(self, cost: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + cost <= self.limit)
            self.used += cost

    async def release(self, cost: int) -> None:
        async with self._changed:
            self.used -= cost
            self._changed.notify_all()
