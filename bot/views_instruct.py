"""Edit with words: a button on a result image (``sd:words:<job>:<index>``) that opens a form, and
the sentence typed ("make it night", "give her a red hat") queues an edit of that image on the
configured edit model (``discord.edit_model``, an InstructPix2Pix checkpoint; see
engine.features.instruct_edit), for whoever pressed, through the same server rules as any job.

Like every button here it is a ``DynamicItem`` whose state is its custom id, so it works after
any restart; it is laid out only where an edit model is configured, and a press on an old message
after the operator removed the model is answered with what happened.
"""

from __future__ import annotations

import re
from typing import Self

import discord
from discord import ui

from bot import jobs
from bot.inputs import BadInput, check_prompt
from bot.reach import ButtonService, service_of
from bot.views import _JobButton
from db.models import Job


class EditWithWords(_JobButton, template=r"sd:words:(?P<job>\d+):(?P<index>\d)"):
    action = "words"

    def __init__(self, job_id: int, index: int, row: int | None = None) -> None:
        super().__init__(job_id, index, label="Edit with words", emoji="🪄", row=row)
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]))

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        if not service.config.discord.edit_model:
            raise BadInput("Edits in words are not set up on this bot any more; try Vary (Region) or Edit.")
        parent = await self.job(service)
        await interaction.response.send_modal(WordsModal(parent, self.index, service.config.discord.max_prompt_chars))


class WordsModal(ui.Modal):
    """The instruction for one image."""

    def __init__(self, parent: Job, index: int, max_chars: int) -> None:
        super().__init__(title=f"Edit image {index + 1} of job #{parent.id}", timeout=900)
        self.parent, self.index = parent, index
        self.sentence = ui.TextInput(
            label="What should change?",
            placeholder="make it night; give her a red hat",
            style=discord.TextStyle.paragraph,
            max_length=min(4000, max_chars),
        )
        self.add_item(self.sentence)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, self._queue(interaction, service))

    async def _queue(self, interaction: discord.Interaction, service: ButtonService) -> None:
        model = service.config.discord.edit_model
        if not model:
            raise BadInput("Edits in words are not set up on this bot any more; try Vary (Region) or Edit.")
        sentence = check_prompt(self.sentence.value, max_chars=service.config.discord.max_prompt_chars)
        image = await service.get_image(self.parent.id, self.index)
        await service.submit_derived(interaction, jobs.words_edit(self.parent, image, sentence, model))


ITEMS = (EditWithWords,)
