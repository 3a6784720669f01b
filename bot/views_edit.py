"""Midjourney's editing buttons on a result image: Vary (Region), Zoom Out, Pan and Make Square.

Each is a ``DynamicItem`` (its state in the custom id, so it works after any restart) that
queues a masked job for whoever pressed it, through the same server rules as every other job.
Vary (Region) has no drawing tool in Discord: it answers privately with the image under a
numbered grid and a menu of the cells, then asks for the prompt in a form. On a grid of several
images, "Edit image…" picks the image first and answers with these buttons for it.
"""

from __future__ import annotations

import asyncio
import io
import re
from typing import Self

import discord
from discord import ui

from bot import jobs, masks
from bot.checks import within_deadline
from bot.inputs import BadInput, check_prompt
from bot.reach import ButtonService, service_of
from bot.views import _JobButton
from bot.views_instruct import EditWithWords
from db.models import Job, ResultImage

PANS = {"left": "⬅️", "right": "➡️", "up": "⬆️", "down": "⬇️"}
ZOOMS = {"15": 1.5, "20": 2.0}


class _ImageButton(_JobButton, template=r"sd:(?P<action>[a-z]+):(?P<job>\d+):(?P<index>\d)"):
    """A button about one image of a job."""

    def __init__(self, job_id: int, index: int, *extra: object, **look: object) -> None:
        super().__init__(job_id, index, *extra, **look)  # type: ignore[arg-type]
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]))

    async def parent_and_image(self, service: ButtonService) -> tuple[Job, ResultImage]:
        parent = await self.job(service)
        return parent, await service.get_image(parent.id, self.index)


class Region(_ImageButton, template=r"sd:region:(?P<job>\d+):(?P<index>\d)"):
    action = "region"

    def __init__(self, job_id: int, index: int, row: int | None = None) -> None:
        super().__init__(job_id, index, label="Vary (Region)", emoji="🖌️", row=row)

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        parent, image = await self.parent_and_image(service)
        overlay = await asyncio.to_thread(masks.grid_overlay, image.png)
        view = ui.View(timeout=None)
        view.add_item(Cells(parent.id, self.index))
        await interaction.response.send_message(
            "Pick the squares to change; then say what to put there.",
            ephemeral=True,
            view=view,
            file=discord.File(io.BytesIO(overlay), filename=f"sd_{parent.id}_grid_{self.index + 1}.png"),
        )


class Cells(ui.DynamicItem[ui.Select], template=r"sd:cells:(?P<job>\d+):(?P<index>\d)"):
    """The multi-select of grid cells under the Vary (Region) picture."""

    def __init__(self, job_id: int, index: int) -> None:
        options = [
            discord.SelectOption(label=f"Square {cell}", value=str(cell))
            for cell in range(1, masks.GRID * masks.GRID + 1)
        ]
        super().__init__(
            ui.Select(
                custom_id=f"sd:cells:{job_id}:{index}",
                placeholder="Squares to change",
                min_values=1,
                max_values=masks.GRID * masks.GRID - 1,
                options=options,
            )
        )
        self.job_id, self.index = job_id, index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Select, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, self._ask_prompt(interaction, service))

    async def _ask_prompt(self, interaction: discord.Interaction, service: ButtonService) -> None:
        values = (interaction.data or {}).get("values") or []
        cells = sorted({int(v) for v in values if str(v).isdigit() and 1 <= int(v) <= masks.GRID * masks.GRID})
        if not cells:
            raise BadInput("Pick at least one square.")
        parent = await service.get_job(self.job_id)
        if parent is None:
            raise BadInput(f"Job #{self.job_id} no longer exists.")
        await interaction.response.send_modal(
            RegionModal(parent, self.index, cells, service.config.discord.max_prompt_chars)
        )


class RegionModal(ui.Modal):
    """The prompt for the chosen squares, prefilled with the job's."""

    def __init__(self, parent: Job, index: int, cells: list[int], max_chars: int) -> None:
        super().__init__(title=f"Vary (Region) of job #{parent.id}", timeout=900)
        limit = min(4000, max_chars)
        self.parent, self.index, self.cells = parent, index, cells
        self.prompt = ui.TextInput(
            label="Prompt for the chosen squares",
            style=discord.TextStyle.paragraph,
            default=parent.prompt[:limit],
            max_length=limit,
        )
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, self._queue(interaction, service))

    async def _queue(self, interaction: discord.Interaction, service: ButtonService) -> None:
        prompt = check_prompt(self.prompt.value, max_chars=service.config.discord.max_prompt_chars)
        image = await service.get_image(self.parent.id, self.index)
        mask = await asyncio.to_thread(masks.cells_mask, (self.parent.width, self.parent.height), self.cells)
        await service.submit_derived(interaction, jobs.region(self.parent, image, mask, prompt))


class _Outpaint(_ImageButton, template=r"sd:(?P<action>zoom|pan|square):(?P<job>\d+):(?P<index>\d)"):
    """Zoom Out, Pan and Make Square: a bigger canvas, its new part masked and filled in."""

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        parent, image = await self.parent_and_image(service)
        gen = service.config.generation_for(parent.model)
        # Building the canvas decodes and encodes PNGs: off the event loop, within the deadline.
        new = await within_deadline(service, interaction, asyncio.to_thread(self.new_job, parent, image, gen))
        await service.submit_derived(interaction, new)

    def new_job(self, parent: Job, image: ResultImage, gen: object) -> jobs.NewJob:
        raise NotImplementedError


class Zoom(_Outpaint, template=r"sd:zoom:(?P<job>\d+):(?P<index>\d):(?P<factor>15|20)"):
    action = "zoom"

    def __init__(self, job_id: int, index: int, factor: str, row: int | None = None) -> None:
        super().__init__(job_id, index, factor, label=f"Zoom Out {ZOOMS[factor]:g}x", emoji="🔍", row=row)
        self.factor = factor

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]), match["factor"])

    def new_job(self, parent: Job, image: ResultImage, gen: object) -> jobs.NewJob:
        return jobs.zoom_out(parent, image, ZOOMS[self.factor], gen)  # type: ignore[arg-type]


class Pan(_Outpaint, template=r"sd:pan:(?P<job>\d+):(?P<index>\d):(?P<side>left|right|up|down)"):
    action = "pan"

    def __init__(self, job_id: int, index: int, side: str, row: int | None = None) -> None:
        super().__init__(job_id, index, side, emoji=PANS[side], row=row)
        self.side = side

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]), match["side"])

    def new_job(self, parent: Job, image: ResultImage, gen: object) -> jobs.NewJob:
        return jobs.pan(parent, image, self.side, gen)  # type: ignore[arg-type]


class Square(_Outpaint, template=r"sd:square:(?P<job>\d+):(?P<index>\d)"):
    action = "square"

    def __init__(self, job_id: int, index: int, row: int | None = None) -> None:
        super().__init__(job_id, index, label="Make Square", emoji="⏹️", row=row)

    def new_job(self, parent: Job, image: ResultImage, gen: object) -> jobs.NewJob:
        return jobs.make_square(parent, image, gen)  # type: ignore[arg-type]


class PickImage(ui.DynamicItem[ui.Select], template=r"sd:pick:(?P<job>\d+)"):
    """On a grid: choose one image; the answer (only you see it) has its editing buttons."""

    def __init__(self, job_id: int, count: int, row: int | None = None) -> None:
        options = [discord.SelectOption(label=f"Image {i + 1}", value=str(i)) for i in range(max(1, count))]
        super().__init__(
            ui.Select(custom_id=f"sd:pick:{job_id}", placeholder="Edit image… (region, zoom, pan)", options=options),
            row=row,
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Select, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), len(item.options))

    async def callback(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, self._answer(interaction, service))

    async def _answer(self, interaction: discord.Interaction, service: ButtonService) -> None:
        values = (interaction.data or {}).get("values") or ["0"]
        index = int(values[0]) if str(values[0]).isdigit() else 0
        job = await service.get_job(self.job_id)
        if job is None:
            raise BadInput(f"Job #{self.job_id} no longer exists.")
        await interaction.response.send_message(
            f"Image {index + 1} of job #{job.id}:",
            ephemeral=True,
            view=edit_view(job, index, words=bool(service.config.discord.edit_model)),
        )


def add_edit_buttons(view: ui.View, job: Job, index: int, first_row: int, *, words: bool = False) -> None:
    """The editing buttons of one image, on two rows from ``first_row``; ``words``: Edit with
    words too (where an edit model is configured)."""
    view.add_item(Region(job.id, index, row=first_row))
    for factor in ZOOMS:
        view.add_item(Zoom(job.id, index, factor, row=first_row))
    if job.width != job.height:
        view.add_item(Square(job.id, index, row=first_row))
    for side in PANS:
        view.add_item(Pan(job.id, index, side, row=first_row + 1))
    if words:  # the second row has 4 pans: room for a fifth
        view.add_item(EditWithWords(job.id, index, row=first_row + 1))


def edit_view(job: Job, index: int, *, words: bool = False) -> ui.View:
    view = ui.View(timeout=None)
    add_edit_buttons(view, job, index, 0, words=words)
    return view


ITEMS = (Region, Cells, Zoom, Pan, Square, PickImage)
