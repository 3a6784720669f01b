"""/describe: four prompts for an uploaded image (Midjourney's), offered where ``[describe]
captioner`` or ``tagger`` is set; its description (so /help) says which prompts the configured
models give. (Annotations stay objects: discord.py reads them.)

The upload is checked as /img2img's (type, size, host, the image filter, every server rule) and
queued as a job of its own kind; a worker's captioner and tagger write the prompts (engine.features.describe)
and delivery posts them with a button each (bot.describe).
"""

import discord
from discord import app_commands
from discord.ext import commands

from bot.inputs import check_attachment_meta
from bot.jobs import NewJob
from bot.policy import Asked
from bot.service import JobService
from db.models import JobKind
from engine.config.describe_settings import DescribeSettings


def description_for(models: DescribeSettings) -> str:
    """What /describe gives with these models (engine.features.describe.mixed). Short: /help has
    no room left in Discord's 6000 characters; the README says the rest."""
    if models.captioner and models.tagger:
        return "Four prompts: text + tags"
    if models.tagger:
        return "Four booru-tag prompts"
    return "Four prompts for an image"


class DescribeCog(commands.Cog, name="describe"):
    def __init__(self, service: JobService) -> None:
        self.service = service
        self.describe.description = description_for(service.config.describe)  # this instance's copy

    @app_commands.command(name="describe", description="Four prompts for an image")
    @app_commands.describe(image="A PNG, JPEG or WebP image, e.g. a photo whose style you want")
    async def describe(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        await self.service.guarded(interaction, self._describe(interaction, image))

    async def _describe(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        dc = self.service.config.discord
        check_attachment_meta(
            filename=image.filename,
            content_type=image.content_type,
            size=image.size,
            url=image.url,
            allowed_types=dc.allowed_image_types,
            max_bytes=dc.max_attachment_bytes,
            allowed_hosts=self.service.allowed_hosts,
        )
        params, _ = await self.service.admit(interaction, Asked(""), image)
        await self.service.submit(interaction, NewJob(JobKind.describe, params.but(count=1)))
