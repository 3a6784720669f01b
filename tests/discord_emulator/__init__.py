"""A local Discord (gateway websocket + REST) that the real discord.py client talks to over sockets.

How a bot test uses it (see tests/test_emulator.py for a complete, running example):

    from discord_emulator import Emulator, patch_discord, running

    async def test_imagine():                     # with pytest-asyncio, or inside asyncio.run
        async with Emulator() as emu:
            with patch_discord(emu):
                bot = make_bot(guild_ready_timeout=0.1)
                async with running(bot, emu):
                    ix = await emu.slash(emu.alice, "imagine", {"prompt": "a cat"})
                    assert await ix.wait_ack() == 5
                    posted = await emu.wait_for_message(emu.general, lambda m: m.attachments)
                    again = await emu.click(emu.bob, posted, posted.custom_ids[0])

(tests/ is on sys.path, as for db_fixtures.) Or use the `emulator` fixture from fixtures.py.
"""

from .harness import patch_discord, running
from .records import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    ATTACH_FILES,
    EMBED_LINKS,
    MANAGE_GUILD,
    MANAGE_MESSAGES,
    MEMBER_PERMISSIONS,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Message,
    User,
)
from .rest import ApiError, Call, Fault
from .server import Emulator

__all__ = [
    "ADMINISTRATOR",
    "ALL_PERMISSIONS",
    "ATTACH_FILES",
    "EMBED_LINKS",
    "MANAGE_GUILD",
    "MANAGE_MESSAGES",
    "MEMBER_PERMISSIONS",
    "SEND_MESSAGES",
    "VIEW_CHANNEL",
    "ApiError",
    "Attachment",
    "Call",
    "Channel",
    "Emulator",
    "Fault",
    "Guild",
    "Interaction",
    "Message",
    "User",
    "patch_discord",
    "running",
]
