"""Apps → "Use as reference" (right-click any message with an image) and the 📌 Reference button
under a one-image result (``sd:ref:<job>:<index>``, a DynamicItem): a form asks for the prompt,
the reference mode and its strength, and queues an /imagine job with that image as its reference.

The message's image is an upload like /imagine's ``reference:``: the job goes through
``JobService.submit_command`` with it, so it gets the same type, size, host, decoding and image
filter checks before anything is stored, and the same mode refusals (bot/references.py). The
form holds the attachment only while it is open (Discord's 15 minutes); nothing is stored.
"""

from __future__ import annotations

import re
from typing import Self

import discord
from discord import ui

from bot.inputs import BadInput, check_prompt
from bot.policy import Asked
from bot.reach import ButtonService
from bot.references import DEFAULT_REFERENCE_MODE, usable_modes
from bot.views import _JobButton
from db.models import JobKind
from engine.control_units import MAX_CONTROL_WEIGHT


def image_attachment(message: discord.Message, allowed_types: tuple[str, ...]) -> discord.Attachment:
    """The message's first attachment of an allowed image type (by its declared type or name)."""
    suffixes = {"image/png": ".png", "image/jpeg": (".jpg", ".jpeg"), "image/webp": ".webp", "image/gif": ".gif"}
    for attachment in message.attachments:
        kind = (attachment.content_type or "").split(";")[0].strip()
        if kind in allowed_types or any(attachment.filename.lower().endswith(suffixes[t]) for t in allowed_types):
            return attachment
    raise BadInput("That message has no image attached; use it on a message with a PNG, JPEG or WebP image.")


def strength_of(text: str) -> float | None:
    """The form's strength (empty: the default), or BadInput saying what to type."""
    if not text.strip():
        return None
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_CONTROL_WEIGHT:
        raise BadInput(f"The strength is a number from 0 to {MAX_CONTROL_WEIGHT:g}, e.g. 0.8.")
    return value


class ReferenceModal(ui.Modal):
    """Prompt, mode and strength for a reference taken from a message."""

    def __init__(self, service: ButtonService, attachment: discord.Attachment, modes: list[str]) -> None:
        super().__init__(title="Use as reference", timeout=900)
        self.service, self.attachment = service, attachment
        max_chars = service.config.discord.max_prompt_chars
        self.prompt = ui.TextInput(label="Prompt", style=discord.TextStyle.paragraph, max_length=min(4000, max_chars))
        listed = ", ".join(modes) or DEFAULT_REFERENCE_MODE
        self.mode = ui.TextInput(label="Reference mode", placeholder=listed[:100], required=False, max_length=20)
        self.strength = ui.TextInput(label="Strength (0 to 2)", placeholder="1", required=False, max_length=8)
        for item in (self.prompt, self.mode, self.strength):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.service.guarded(interaction, self._queue(interaction))

    async def _queue(self, interaction: discord.Interaction) -> None:
        prompt = check_prompt(self.prompt.value, max_chars=self.service.config.discord.max_prompt_chars)
        mode = self.mode.value.strip().lower() or None
        asked = Asked(prompt, reference_mode=mode, reference_strength=strength_of(self.strength.value))
        await self.service.submit_command(interaction, JobKind.txt2img, asked, reference=self.attachment)


def reference_modal(service: ButtonService, message: discord.Message) -> ReferenceModal:
    """The form for ``message``'s image (BadInput when it has none), listing the default model's modes."""
    config = service.config
    attachment = image_attachment(message, config.discord.allowed_image_types)
    modes = usable_modes(config.model.controlnet_dir, (), config.model.ip_adapter)
    return ReferenceModal(service, attachment, modes)


class UseAsReference(_JobButton, template=r"sd:ref:(?P<job>\d+):(?P<index>\d)"):
    """The result's image (its message's attachment, as Discord serves it) as a new job's reference."""

    action = "ref"

    def __init__(self, job_id: int, index: int, row: int | None = None) -> None:
        super().__init__(job_id, index, label="Reference", emoji="📌", row=row)
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(int(match["job"]), int(match["index"]))

    async def run(self, interaction: discord.Interaction, service: ButtonService) -> None:
        if interaction.message is None:
            raise BadInput("That result's message is gone; use Apps → Use as reference on the image instead.")
        await interaction.response.send_modal(reference_modal(service, interaction.message))


ITEMS = (UseAsReference,)
