"""Shared set-up for the bot's end-to-end tests: a test configuration (64x64, 2 steps), a
temporary SQLite queue, the engine worker on the tiny model, and the real bot client.

(Not a test module: the bot tests import it, as they import the emulator package.)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine

from bot.client import SDBot
from bot.config import Config, DiscordSettings, QueueSettings
from bot.wiring import BotApp, build_bot, open_queue
from db.queue import Queue
from db.session import make_engine, upgrade
from discord_emulator import Emulator, running
from engine.config.settings import EngineSettings, GenerationSettings, ModelSettings

EMULATOR_HOSTS = frozenset({"127.0.0.1"})


def bot_config(model_source: str, db_url: str, guild_id: int, **discord_overrides) -> Config:
    """Small and fast: 64x64 images (128 at most, for upscales), 2 steps, frequent progress."""
    return Config(
        model=ModelSettings(source=model_source, name="tiny-sd1"),
        engine=EngineSettings(device="cpu", dtype="float32", max_batch=4, preview_every=1),
        generation=GenerationSettings(
            default_steps=2,
            max_steps=8,
            default_width=64,
            default_height=64,
            max_width=128,
            max_height=128,
            sizes=("64x64", "64x128", "128x64"),
            default_guidance=5.0,
            max_guidance=15.0,
            max_count=4,
            default_strength=0.6,
        ),
        queue=QueueSettings(database_url=db_url, pending_limit=3, max_attempts=2, lease_seconds=60),
        discord=replace(
            DiscordSettings(guild_ids=(guild_id,), progress_interval=0.2, max_attachment_bytes=256 * 1024),
            **discord_overrides,
        ),
        token="emulator-token",
    )


def new_queue(db_path: Path, config: Config) -> tuple[Engine, Queue]:
    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine)
    return engine, open_queue(engine, config)


def make_app(config: Config, queue: Queue, worker, **kwargs) -> BotApp:
    """The real bot, built by the production wiring, with a runner over ``worker`` (None: a bot
    without a local engine)."""
    kwargs.setdefault("allowed_hosts", EMULATOR_HOSTS)
    return build_bot(
        config, queue, worker, worker_name="test-worker", poll_interval=0.1, guild_ready_timeout=0.1, **kwargs
    )


def make_bot(config: Config, queue: Queue, worker, **kwargs) -> SDBot:
    return make_app(config, queue, worker, **kwargs).bot


@contextlib.asynccontextmanager
async def bot_running(emu: Emulator, config: Config, queue: Queue, worker, **kwargs) -> AsyncIterator[SDBot]:
    bot = make_bot(config, queue, worker, **kwargs)
    async with running(bot, emu):
        yield bot


def png(size: tuple[int, int] = (48, 40), color: str = "red", mode: str = "RGB", fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, fmt, **save)
    return out.getvalue()


@contextlib.contextmanager
def running_setup(emulator: Emulator, config: Config, model, tmp_path: Path):
    """``(emulator, config, queue, worker)``: a temporary SQLite queue and a started engine worker
    on ``model`` with ``config``'s settings; stopped and closed on the way out."""
    from engine.serving.worker import EngineWorker

    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    worker = EngineWorker(model, config.engine, config.generation, upscalers=config.upscalers)
    worker.start()
    try:
        yield emulator, config, queue, worker
    finally:
        worker.stop()
        engine.dispose()


@pytest.fixture
def setup(tiny_model, tiny_sd_folder, tmp_path, emulator: Emulator):
    """The emulator, a small config, a temporary SQLite queue and an engine worker on the tiny
    model (for tests whose jobs really run)."""
    config = bot_config(str(tiny_sd_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    with running_setup(emulator, config, tiny_model, tmp_path) as parts:
        yield parts


@pytest.fixture
def queued_setup(tmp_path, emulator: Emulator):
    """No engine: jobs stay queued, so a test reads what was stored; with the server's settings."""
    from db.community import Community

    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue, Community(engine)
    engine.dispose()


async def help_embeds(emu: Emulator, ix=None) -> list[dict]:
    """Every embed /help answers with, its followups included (a long configuration's /help goes
    on in them), once its last line has come."""
    ix = ix or await emu.slash(emu.alice, "help")
    await ix.wait_response(lambda m: any("jobs waiting at a time." in e["description"] for e in m.embeds))
    return [e for m in ix.messages if not m.loading for e in m.embeds]


def is_result(message) -> bool:
    """A posted result (not a status message): it carries the Reroll button."""
    return any(cid.startswith("sd:reroll:") for cid in message.custom_ids)


def results(emu: Emulator) -> list:
    return [m for m in emu.channel_messages(emu.general) if is_result(m)]
