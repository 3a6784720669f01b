"""/describe's result: the four prompts the captioner wrote for an upload, each with a button that
queues it as /imagine would (for whoever presses).

The prompts are the ``parameters`` of the job's result PNGs (engine.features.describe), so the
message is drawn, and each button answered, from the database alone: they work after a restart.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Self

import discord
from discord import ButtonStyle, ui

from bot import render
from bot.reach import service_of
from bot.views import Delete, Info
from bot.views_safety import Report
from db.models import Job, ResultImage
from engine.metadata import read_parameters

NUMBERS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣")


def prompts_of(images: Sequence[ResultImage]) -> list[str]:
    """The prompts, in order (reads each PNG's text chunks, not its pixels)."""
    return [read_parameters(image.png).get("Prompt", "") for image in sorted(images, key=lambda im: im.index)]


class UsePrompt(ui.DynamicItem[ui.Button], template=r"sd:prompt:(?P<job>\d+):(?P<index>\d)"):
    """Queue prompt ``index`` of /describe job ``job`` as a new /imagine job."""

    def __init__(self, job_id: int, index: int) -> None:
        button = ui.Button(emoji=NUMBERS[index], style=ButtonStyle.primary, custom_id=f"sd:prompt:{job_id}:{index}")
        super().__init__(button, row=0)
        self.job_id, self.index = job_id, index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)

        async def imagine() -> None:
            image = await service.get_image(self.job_id, self.index)
            (prompt,) = prompts_of([image])
            await service.submit_prompt(interaction, prompt)

        await service.guarded(interaction, imagine())


def describe_message(job: Job, images: Sequence[ResultImage], *, spoiler: bool = False) -> render.ResultMessage:
    """The mention, the prompts numbered as their buttons, and the upload's thumbnail."""
    prompts = prompts_of(images)
    listed = "\n".join(f"{NUMBERS[i]} {render.clip(render.escape(p), 400)}" for i, p in enumerate(prompts))
    embed = discord.Embed(title="/describe", description=listed, colour=render.COLOR_DONE)
    embed.set_footer(text=f"{render.job_title(job)} · press a number to imagine that prompt")
    files = []
    if images:
        name = f"sd_{job.id}_described.png"
        files.append(discord.File(io.BytesIO(images[0].png), filename=name, spoiler=spoiler))
        if not spoiler:
            embed.set_thumbnail(url=f"attachment://{name}")
    return render.ResultMessage(content=f"<@{job.requester_id}>", embed=embed, files=files)


def describe_view(job: Job, count: int) -> ui.View:
    view = ui.View(timeout=None)
    for i in range(min(count, len(NUMBERS))):
        view.add_item(UsePrompt(job.id, i))
    for item in (Info(job.id, row=1), Delete(job.id, row=1), Report(job.id, row=1)):
        view.add_item(item)
    return view
