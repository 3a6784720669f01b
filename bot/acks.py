"""Interactions acknowledged before their job exists, kept so that a crash cannot strand them.

Usually a job is stored before its interaction is acknowledged (:meth:`JobService.submit`).
When the checks take longer than Discord's deadline allows (a slow download, a busy database),
the bot must acknowledge first; then it records the interaction (its token is valid for 15
minutes) before the "thinking…" message, and forgets it once the job is stored or the member
has been answered. A bot that starts again answers every recorded interaction whose token is
still valid: "the bot restarted before your job was queued".
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta

import discord
from sqlalchemy import Engine, select

from db.models import Job
from db.session import session_makers
from db.state import StateStore

log = logging.getLogger(__name__)

PREFIX = "ack:"
#: Discord's interaction tokens last 15 minutes; a little less, to be sure an answer can land.
TOKEN_LIFETIME = timedelta(minutes=14)
RESTARTED = "⚠️ The bot restarted before your job was queued, so nothing was queued. Please run the command again."


def ack_key(interaction_id: int) -> str:
    return f"{PREFIX}{interaction_id}"


class PendingAcks:
    def __init__(self, state: StateStore, engine: Engine) -> None:
        self.state = state
        _, self._read = session_makers(engine)  # a read: no wait for SQLite's write turn

    def _has_job(self, token: str) -> bool:
        """Whether the job was stored after all (the crash came after the enqueue)."""
        with self._read() as session:
            return session.scalar(select(Job.id).where(Job.interaction_token == token).limit(1)) is not None

    @staticmethod
    def entry(interaction: discord.Interaction, now: datetime) -> tuple[str, str]:
        """The record (key, value) to store just before a "thinking…" with no job behind it."""
        value = {
            "app_id": interaction.application_id,
            "token": interaction.token,
            "expires_at": (now + TOKEN_LIFETIME).isoformat(),
        }
        return ack_key(interaction.id), json.dumps(value)

    async def answer_stranded(self, client: discord.Client, now: datetime) -> int:
        """Answer every interaction a previous run acknowledged and left without a job; returns
        how many were answered."""
        answered = 0
        for key, raw in (await asyncio.to_thread(self.state.with_prefix, PREFIX)).items():
            value = json.loads(raw)
            stranded = not await asyncio.to_thread(self._has_job, value["token"])
            if stranded and datetime.fromisoformat(value["expires_at"]) > now:
                webhook = discord.Webhook.partial(value["app_id"], value["token"], client=client)
                try:
                    await webhook.edit_message("@original", content=RESTARTED, view=None)
                    answered += 1
                except discord.HTTPException as e:  # deleted, or the token ran out meanwhile
                    log.info("could not answer interaction %s after the restart: %s", key.removeprefix(PREFIX), e)
            await asyncio.to_thread(self.state.delete, key)
        if answered:
            log.info("answered %d interaction(s) acknowledged before a restart without a job", answered)
        return answered
