"""Looking jobs up and cancelling them: what :class:`~bot.service.JobService` does for /info,
/show, /cancel and the buttons (a part of it, kept apart for its size, mixed into it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot import render
from bot.checks import manages_messages_in
from bot.config import Config
from bot.delivery import Delivery
from bot.inputs import BadInput
from db.models import Job, ResultImage
from db.queue import Queue


class JobLookups:
    """The job service's lookups and cancelling (mixed into JobService)."""

    config: Config
    queue: Queue
    runner: Any | None
    delivery: Delivery
    run_check: Callable[..., Awaitable[Any]]

    async def get_job(self, job_id: int) -> Job | None:
        return await self.run_check(self.queue.get, job_id)

    async def job_here(self, interaction: discord.Interaction, job_id: int) -> Job:
        """Job ``job_id`` if it belongs to this server (other servers' prompts stay private)."""
        job = await self.get_job(job_id)
        if job is None or job.guild_id != interaction.guild_id:
            raise BadInput(f"There is no job #{job_id} on this server.")
        return job

    async def get_image(self, job_id: int, index: int) -> ResultImage:
        images = await self.run_check(self.queue.images, job_id)
        for image in images:
            if image.index == index:
                return image
        raise BadInput(f"Job #{job_id} has no image {index + 1}.")

    async def show_info(self, interaction: discord.Interaction, job: Job) -> None:
        position = await self.run_check(self.queue.position, job.id)
        await interaction.response.send_message(
            render.info_text(job, self.config.model.display_name, position), ephemeral=True
        )

    async def latest_pending(self, user_id: int) -> Job:
        pending = await self.run_check(self.queue.pending_for, user_id)
        if not pending:
            raise BadInput("You have no jobs waiting.")
        return pending[-1]

    async def cancel(self, interaction: discord.Interaction, job: Job) -> None:
        """Cancel for the requester or a member with Manage Messages in the job's channel (the
        queue checks who may)."""
        moderator = manages_messages_in(interaction, job.channel_id)
        cancelled = await asyncio.to_thread(self.queue.cancel, job.id, interaction.user.id, moderator=moderator)
        self.stopped([job.id])
        await interaction.response.send_message(f"Cancelled {render.job_title(cancelled)}.", ephemeral=True)

    def stopped(self, job_ids: list[int]) -> None:
        """Jobs were cancelled in the database: stop them in the engine, update their messages."""
        for job_id in job_ids:
            if self.runner is not None:
                self.runner.cancel(job_id)
            self.delivery.on_finished(job_id)
