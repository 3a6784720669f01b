"""Discord's answers that delivery tells apart: worth trying again, or final; and, among the
final ones, a refused direct message and a channel where the bot may not post."""

from __future__ import annotations

import discord

#: The member does not accept DMs from the bot (their privacy settings, or a block).
CANNOT_DM = 50007
#: 50013 Missing Permissions (Send Messages, Attach Files...); 50001 Missing Access (no View Channel).
NO_PERMISSION = frozenset({50013, 50001})


def permanent(error: discord.HTTPException) -> bool:
    """Whether trying again cannot help: a 4xx (deleted channel or message, missing permissions,
    a refused message) other than a rate limit, which discord.py waits out itself anyway."""
    return 400 <= error.status < 500 and error.status != 429


def lacks_permission(error: discord.HTTPException) -> bool:
    """Whether Discord refused because the bot may not do this in the channel."""
    return error.status == 403 and error.code in NO_PERMISSION


def dm_refusal(error: discord.HTTPException) -> str:
    """Why a direct message failed, said to the member."""
    if error.code == CANNOT_DM:
        return "Discord would not deliver it (your DMs are closed to the bot)"
    return f"the direct message failed ({error.text or error.status})"
