"""The bot's health and metrics endpoint, and its supervised background tasks, end to end."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

import bot.client
from bot_harness import make_app, make_bot, results, setup  # noqa: F401 - setup is a fixture
from discord_emulator import running
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from ops import OpsSettings

pytestmark = pytest.mark.asyncio


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def test_healthz_and_metrics_follow_the_bot(setup):
    emu, config, queue, worker = setup
    config = replace(config, ops=OpsSettings(enabled=True, port=0))
    app = make_app(config, queue, worker)
    bot, app_ops = app.bot, app.ops
    async with running(bot, emu):
        await app_ops.start()
        try:
            status, body = await get(f"{app_ops.url}/healthz")
            assert status == 200 and '"queue-runner": true' in body and '"delivery": true' in body
            ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse"})
            await ix.wait_response(lambda m: "queued" in m.content)
            await emu.wait_for(lambda: len(results(emu)) == 1, what="the result", timeout=120)

            async def counted() -> bool:
                return 'sdbot_jobs_finished_total{status="done"} 1.0' in (await get(f"{app_ops.url}/metrics"))[1]

            for _ in range(600):
                if await counted():
                    break
                await asyncio.sleep(0.1)
            status, text = await get(f"{app_ops.url}/metrics")
            assert 'sdbot_jobs_finished_total{status="done"} 1.0' in text
            assert "sdbot_discord_connected 1.0" in text and "sdbot_database_up 1.0" in text
            assert "sdbot_images_generated_total 1.0" in text and "sdbot_batch_rows 0.0" in text
            bot.task("queue-runner").cancel()  # a task that is not running fails the check
            await asyncio.sleep(0)
            status, body = await get(f"{app_ops.url}/healthz")
            assert status == 503 and "queue-runner" in body
        finally:
            await app_ops.stop()


async def test_a_crashed_background_task_restarts_and_one_that_keeps_failing_stops_the_bot(setup, monkeypatch):
    emu, config, queue, _ = setup
    monkeypatch.setattr(bot.client, "RESTART_DELAYS", (0.01, 0.01, 0.01))
    client = make_bot(config, queue, None)
    runs = []

    async def flaky() -> None:
        runs.append(1)
        raise RuntimeError("database went away")

    async with running(client, emu):
        client.start_task(flaky, "flaky")
        await emu.wait_for(lambda: client.is_closed(), what="the bot to give up", timeout=60)
    assert len(runs) == 4  # the first run and three restarts
    assert isinstance(client.fatal, RuntimeError)
