"""Your jobs: /queue, /cancel, /info and /show. (Annotations stay objects: see generate.py.)"""

import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot import render
from bot.inputs import BadInput
from bot.service import JobService
from bot.transformers import Options


def jobs_cog(service: JobService, o: Options) -> commands.Cog:
    class Jobs(commands.Cog, name="jobs"):
        """A member's jobs: where they are in line, cancelling, every parameter, the result again."""

        def __init__(self, service: JobService) -> None:
            self.service = service

        @app_commands.command(name="queue", description="Your jobs and their places in line")
        async def queue(self, interaction: discord.Interaction) -> None:
            await self.service.guarded(interaction, self._queue(interaction))

        async def _queue(self, interaction: discord.Interaction) -> None:
            queue = self.service.queue
            pending = await self.service.run_check(queue.pending_for, interaction.user.id)
            if not pending:
                await interaction.response.send_message("You have no jobs waiting.", ephemeral=True)
                return
            lines = []
            for job in pending:
                position = await self.service.run_check(queue.position, job.id)
                where = f"place {position} in line" if position else "running"
                lines.append(f"**{render.job_title(job)}**, {where}: {render.excerpt(job.prompt, 60)}")
            await interaction.response.send_message("\n".join(lines), ephemeral=True)

        @app_commands.command(name="cancel", description="Cancel one of your jobs (your latest when no job is given)")
        @app_commands.describe(job="The job number (from the job's message)")
        async def cancel(self, interaction: discord.Interaction, job: Transform[int, o.job] = None) -> None:
            await self.service.guarded(interaction, self._cancel(interaction, job))

        async def _cancel(self, interaction: discord.Interaction, job_id: int | None) -> None:
            if job_id is None:
                job_id = (await self.service.latest_pending(interaction.user.id)).id
            await self.service.cancel(interaction, await self.service.job_here(interaction, job_id))

        @app_commands.command(name="info", description="Every parameter of a job, its seed and status")
        @app_commands.describe(job="The job number (from the job's message)")
        async def info(self, interaction: discord.Interaction, job: Transform[int, o.job]) -> None:
            await self.service.guarded(interaction, self._info(interaction, job))

        async def _info(self, interaction: discord.Interaction, job_id: int) -> None:
            await self.service.show_info(interaction, await self.service.job_here(interaction, job_id))

        @app_commands.command(name="show", description="Post a finished job's result again, with its buttons")
        @app_commands.describe(job="The job number (from the job's message)")
        async def show(self, interaction: discord.Interaction, job: Transform[int, o.job]) -> None:
            await self.service.guarded(interaction, self._show(interaction, job))

        async def _show(self, interaction: discord.Interaction, job_id: int) -> None:
            """Any member may bring back a result of this server; a private one only its requester,
            and only to themselves."""
            job = await self.service.job_here(interaction, job_id)
            defaults = await self.service.run_check(self.service.community.member_defaults, job.requester_id)
            private = defaults.private_results
            if private and interaction.user.id != job.requester_id:
                raise BadInput(f"Job #{job.id}'s results are private to the member who made it.")
            await self.service.delivery.show_again(interaction, job, ephemeral=private)

    return Jobs(service)


__all__ = ["jobs_cog"]
