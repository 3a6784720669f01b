"""The interaction callback (the acknowledgement), retried until Discord's deadline and no longer.

discord.py retries a callback that met a 5xx after 1, 3, 5... seconds, and one that met a 429
after its ``retry_after``, however long: past the 3 seconds Discord gives, every retry only
earns ``10062 Unknown interaction``. And a retry after an answer that was lost (a 500 or a
timeout once Discord had taken the callback) meets ``40060 already acknowledged``, which
discord.py reports as a failure, though the member sees "thinking…".

:func:`acknowledging` installs, for the calls made inside it, a webhook adapter (discord.py's
``async_context``, as its own tests swap it) whose callbacks retry a 5xx, a 429 and a lost
answer quickly, only while the deadline leaves room, and take a 40060 after such a failure
for the success it is. Every other webhook call keeps discord.py's own adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import discord
from discord.http import json_or_text
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

log = logging.getLogger(__name__)

#: Pauses before the retries of a callback that met a 5xx or no answer (then the last, again).
PAUSES = (0.1, 0.25, 0.5)
#: Kept free before the deadline: a request sent later would arrive too late to count.
MARGIN = 0.15
ALREADY_ACKNOWLEDGED = 40060


class DeadlineAdapter(AsyncWebhookAdapter):
    """discord.py's webhook adapter, with callbacks retried within ``deadline`` (time.monotonic())."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    async def request(self, route: Any, session: aiohttp.ClientSession, **kwargs: Any) -> Any:
        if not route.path.endswith("/callback") or kwargs.get("files") or kwargs.get("multipart"):
            return await super().request(route, session, **kwargs)
        failed_before = False
        for attempt in range(100):
            left = self.deadline - MARGIN - time.monotonic()
            if left <= 0:
                break
            try:
                async with session.request(
                    route.method,
                    route.url,
                    data=discord.utils._to_json(kwargs["payload"]),
                    headers={"Content-Type": "application/json"},
                    params=kwargs.get("params"),
                    timeout=aiohttp.ClientTimeout(total=left),
                ) as response:
                    data = await json_or_text(response)
                    if 200 <= response.status < 300:
                        return data
                    code = data.get("code") if isinstance(data, dict) else None
                    if response.status == 400 and code == ALREADY_ACKNOWLEDGED and failed_before:
                        # An earlier try went through and only its answer was lost.
                        return {"interaction": {"id": str(route.webhook_id), "response_message_loading": True}}
                    if response.status == 429 and isinstance(data, dict):
                        pause = float(data.get("retry_after", 1.0))
                    elif response.status >= 500:
                        pause = PAUSES[min(attempt, len(PAUSES) - 1)]
                    else:
                        _raise(response, data)
                    failed_before = True
                    log.info("interaction callback answered %s; retrying in %.2f s", response.status, pause)
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                failed_before = True  # it may have gone through: a 40060 next says so
                pause = PAUSES[min(attempt, len(PAUSES) - 1)]
                log.info("interaction callback got no answer (%s); retrying", type(error).__name__)
            if time.monotonic() + pause >= self.deadline - MARGIN:
                break
            await asyncio.sleep(pause)
        raise discord.NotFound(_Late(), {"code": 10062, "message": "Unknown interaction (our deadline passed)"})


def _raise(response: aiohttp.ClientResponse, data: Any) -> None:
    if response.status == 403:
        raise discord.Forbidden(response, data)
    if response.status == 404:
        raise discord.NotFound(response, data)
    raise discord.HTTPException(response, data)


class _Late:
    """What discord.HTTPException reads of a response, for the deadline passed without one."""

    status = 404
    reason = "Not Found"


@contextlib.contextmanager
def acknowledging(deadline: float) -> Iterator[None]:
    """Callbacks made inside the block retry within ``deadline`` (a time.monotonic() value)."""
    token = async_context.set(DeadlineAdapter(deadline))
    try:
        yield
    finally:
        async_context.reset(token)
