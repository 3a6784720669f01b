"""Buttons on queued and finished jobs, and the Edit modal.

Every button is a ``DynamicItem`` whose ``custom_id`` holds the job id (``sd:reroll:42``), so a
press is understood after any restart and on messages of any age: the rest is looked up in the
database. Anyone may press Reroll, Vary, Upscale and Edit (the new job belongs to whoever
pressed); Cancel and Delete are for the requester or members with Manage Messages.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Self

import discord
from discord import ButtonStyle, ui

from bot import jobs
from bot.checks import may_moderate, within_deadline
from bot.inputs import BadInput, check_prompt, check_prompt_text
from bot.reach import ButtonService, service_of
from db.models import Job


class _JobButton(ui.DynamicItem[ui.Button], template=r"sd:(?P<action>[a-z]+):(?P<job>\d+)"):
    """A button about one job; subclasses give the template, the look and the action."""

    action: str = ""

    def __init__(
        self,
        job_id: int,
        *extra: Any,
        label: str | None = None,
        emoji: str | None = None,
        style: ButtonStyle = ButtonStyle.secondary,
        row: int | None = None,
    ) -> None:
        custom_id = ":".join(["sd", self.action, str(job_id), *map(str, extra)])
        super().__init__(ui.Button(label=label, emoji=emoji, style=style, custom_id=custom_id), row=row)
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match: re.Match[str]) -> Self:
        """discord.py makes the button of a pressed ``custom_id`` (after any restart) with this."""
        return cls.from_match(match)

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, self.run(interaction, service))

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        raise NotImplementedError

    async def job(self, service: ButtonService) -> Job:
        job = await service.get_job(self.job_id)
        if job is None:
            raise BadInput(f"Job #{self.job_id} no longer exists.")
        return job


class Cancel(_JobButton, template=r"sd:cancel:(?P<job>\d+)"):
    action = "cancel"

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id, label="Cancel", emoji="✖️", style=ButtonStyle.danger)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        await service.cancel(interaction, await self.job(service))


class Reroll(_JobButton, template=r"sd:reroll:(?P<job>\d+)"):
    action = "reroll"

    def __init__(self, job_id: int, row: int | None = None) -> None:
        super().__init__(job_id, label="Reroll", emoji="🔁", row=row)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        await service.submit_derived(interaction, jobs.reroll(await self.job(service)))


class Vary(_JobButton, template=r"sd:vary:(?P<job>\d+):(?P<index>\d):(?P<level>subtle|strong)"):
    action = "vary"

    def __init__(self, job_id: int, index: int, level: str, *, grid: bool, row: int | None = None) -> None:
        label = f"V{index + 1}" if grid else f"Vary ({level})"
        super().__init__(job_id, index, level, label=label, row=row)
        self.index, self.level = index, level

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]), match["level"], grid=False)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        parent = await self.job(service)
        image = await service.get_image(parent.id, self.index)
        await service.submit_derived(interaction, jobs.variation(parent, image.seed, self.level))


class Upscale(_JobButton, template=r"sd:up:(?P<job>\d+):(?P<index>\d)(?::(?P<mode>subtle|creative))?"):
    """Upscale (Subtle) and Upscale (Creative) (``sd:up:<job>:<index>:<mode>``) queue an upscale;
    without a mode (a grid's U1-U4, and the single "Upscale" of older messages) the button
    answers, only to whoever pressed it, with those two for its image."""

    action = "up"

    def __init__(
        self, job_id: int, index: int, mode: str | None = None, *, grid: bool = False, row: int | None = None
    ) -> None:
        if mode is None:
            (label, emoji), extra = (f"U{index + 1}", None) if grid else ("Upscale", "⬆️"), (index,)
        else:
            (label, emoji), extra = (f"Upscale ({mode.title()})", "⬆️"), (index, mode)
        super().__init__(job_id, *extra, label=label, emoji=emoji, row=row)
        self.index, self.mode = index, mode

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]), match["mode"])

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        parent = await self.job(service)
        image = await service.get_image(parent.id, self.index)
        gen = service.config.generation_for(parent.model)
        if jobs.upscaled_size(image, gen) is None:  # reads the PNG's header only
            raise BadInput(
                f"This image is already at the largest size allowed here ({gen.max_width}x{gen.max_height})."
            )
        if self.mode is None:
            view = ui.View(timeout=None)
            for mode in jobs.UPSCALE_MODES:
                view.add_item(Upscale(parent.id, self.index, mode))
            await interaction.response.send_message(upscale_choice(parent.id, self.index), view=view, ephemeral=True)
            return
        # Listing the upscaler folder touches the disk: in a thread, within the deadline.
        upscalers = service.config.upscalers
        made = asyncio.to_thread(jobs.upscale, parent, image, gen, self.mode, upscalers)
        await service.submit_derived(interaction, await within_deadline(service, interaction, made))


def upscale_choice(job_id: int, index: int) -> str:
    return (
        f"Upscale image {index + 1} of job #{job_id} to {jobs.UPSCALE_FACTOR:g}x: **Subtle** keeps it as it is "
        f"(the upscaler alone); **Creative** adds detail (the upscaler, then img2img at strength "
        f"{jobs.UPSCALE_STRENGTH})."
    )


class Edit(_JobButton, template=r"sd:edit:(?P<job>\d+)"):
    action = "edit"

    def __init__(self, job_id: int, row: int | None = None) -> None:
        super().__init__(job_id, label="Edit", emoji="✏️", row=row)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        parent = await self.job(service)
        await interaction.response.send_modal(EditModal(parent, service.config.discord.max_prompt_chars))


class Info(_JobButton, template=r"sd:info:(?P<job>\d+)"):
    action = "info"

    def __init__(self, job_id: int, row: int | None = None) -> None:
        super().__init__(job_id, label="Info", emoji="ℹ️", row=row)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        await service.show_info(interaction, await self.job(service))


class Delete(_JobButton, template=r"sd:del:(?P<job>\d+)"):
    action = "del"

    def __init__(self, job_id: int, row: int | None = None) -> None:
        super().__init__(job_id, label="Delete", emoji="🗑️", style=ButtonStyle.danger, row=row)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        job = await self.job(service)
        if not may_moderate(interaction, job.requester_id):
            raise BadInput("Only the member who asked for this image, or someone with Manage Messages, can delete it.")
        await interaction.response.defer()
        await interaction.message.delete()


ITEMS = (Cancel, Reroll, Vary, Upscale, Edit, Info, Delete)


class EditModal(ui.Modal):
    """Prompt and negative prompt, prefilled from the job; submitting queues a new job."""

    def __init__(self, parent: Job, max_chars: int) -> None:
        super().__init__(title=f"Edit job #{parent.id}", timeout=900)
        limit = min(4000, max_chars)
        self.parent = parent
        self.prompt = ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=parent.prompt[:limit], max_length=limit
        )
        self.negative = ui.TextInput(
            label="Negative prompt",
            style=discord.TextStyle.paragraph,
            default=parent.negative_prompt[:limit] or None,
            required=False,
            max_length=limit,
        )
        self.add_item(self.prompt)
        self.add_item(self.negative)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, self._queue(interaction, service))

    async def _queue(self, interaction: discord.Interaction, service: ButtonService) -> None:
        config = service.config
        limit = config.discord.max_prompt_chars
        prompt = check_prompt(self.prompt.value, max_chars=limit)
        negative = check_prompt(self.negative.value, max_chars=limit, name="negative prompt", required=False)
        lora_dir = config.model_settings(self.parent.model).lora_dir
        note = await within_deadline(
            service, interaction, service.run_check(check_prompt_text, prompt, negative, lora_dir)
        )
        await service.submit_derived(interaction, jobs.edit(self.parent, prompt, negative), note=note)
