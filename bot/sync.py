"""Registering the slash commands with Discord only when they changed.

discord.py's own guidance is not to sync on every start: Discord rate-limits command updates,
and a sync can take seconds. The payload that would be sent is hashed per scope (each
configured server, or global) and the hash kept in the database; a start with the same
commands sends nothing. ``python -m bot --sync`` forces it. When commands are registered per
server, global commands left from an earlier run are cleared once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import discord
from discord import app_commands

from db.state import StateStore

log = logging.getLogger(__name__)


def payload_hash(tree: app_commands.CommandTree, guild: discord.abc.Snowflake | None) -> str:
    payload = [command.to_dict(tree) for command in tree._get_all_commands(guild=guild)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


async def sync_commands(
    tree: app_commands.CommandTree, state: StateStore, guild_ids: tuple[int, ...], *, force: bool = False
) -> list[str]:
    """Sync the scopes whose commands changed (all with ``force``); returns the scopes synced."""
    synced = []
    scopes: list[discord.Object | None] = [discord.Object(g) for g in guild_ids] or [None]
    if guild_ids:
        for guild in scopes:
            tree.copy_global_to(guild=guild)
        tree.clear_commands(guild=None)  # registered per server only: nothing global
        scopes.append(None)  # ...and clear what an earlier, global configuration left
    for guild in scopes:
        key = f"commands:{guild.id if guild else 'global'}"
        digest = payload_hash(tree, guild)
        if not force and await asyncio.to_thread(state.get, key) == digest:
            continue
        await tree.sync(guild=guild)
        await asyncio.to_thread(state.put, key, digest)
        synced.append(key)
    if synced:
        log.info("commands synced: %s", ", ".join(synced))
    return synced
