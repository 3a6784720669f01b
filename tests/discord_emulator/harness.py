"""Pointing the real discord.py client at an Emulator, and running a bot against it in a test.

    async with Emulator() as emu, patch_discord(emu), running(bot, emu):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a cat"})

`patch_discord` sets the two class attributes DISCORD.md §1 names and puts them back after.
`running` starts `bot.start(emu.token)` as a task, waits until the bot is ready, and closes it
at the end (re-raising whatever made it stop early).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import discord
import yarl

from .server import Emulator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def patch_discord(emulator: Emulator) -> Iterator[None]:
    """Route discord.py's REST and gateway to `emulator` for the duration of the block."""
    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = emulator.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emulator.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("bot stopped with an error", exc_info=task.exception())


@contextlib.asynccontextmanager
async def running(bot: discord.Client, emulator: Emulator, *, timeout: float = 10.0) -> AsyncIterator[discord.Client]:
    """Run `bot` against `emulator` (already patched in) until the block ends.

    Give the bot `guild_ready_timeout=0.1` (a Client/Bot keyword): discord.py otherwise waits 2 s
    after the last GUILD_CREATE before `on_ready`.
    """
    task = asyncio.create_task(bot.start(emulator.token), name="bot under test")
    task.add_done_callback(_log_crash)
    ready = asyncio.create_task(bot.wait_until_ready())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what stopped the bot (LoginFailure, an error in setup_hook...)
            raise RuntimeError("the bot stopped before it was ready")
        if not done:
            raise TimeoutError(f"the bot was not ready within {timeout} s")
        await emulator.wait_connected(timeout)
        yield bot
    finally:
        ready.cancel()
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout)
