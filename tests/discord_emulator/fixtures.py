"""pytest fixtures for the emulator (need pytest-asyncio). Import them in a conftest or test module:

from discord_emulator.fixtures import emulator  # noqa: F401
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from .harness import patch_discord
from .server import Emulator


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """A started Emulator with discord.py pointed at it; undone after the test."""
    async with Emulator() as emu:
        with patch_discord(emu):
            yield emu
