"""The image policy's buttons: 🚩 Report under every result, 👁️ Reveal under a blurred one.

Like every result button they are ``DynamicItem``\\ s holding the job id in their ``custom_id``
(``sd:report:42``), so they work after any restart; what they do is
:class:`bot.safety.moderation.Moderation`'s, reached through the client (:mod:`bot.reach`).
"""

from __future__ import annotations

import discord

from bot.reach import moderation_of, service_of
from bot.views import _JobButton


class Report(_JobButton, template=r"sd:report:(?P<job>\d+)"):
    action = "report"

    def __init__(self, job_id: int, row: int | None = None) -> None:
        super().__init__(job_id, label="Report", emoji="🚩", row=row)

    async def callback(self, interaction: discord.Interaction) -> None:
        await service_of(interaction).guarded(interaction, moderation_of(interaction).report(interaction, self.job_id))


class Reveal(_JobButton, template=r"sd:reveal:(?P<job>\d+)"):
    action = "reveal"

    def __init__(self, job_id: int, row: int | None = None) -> None:
        super().__init__(job_id, label="Reveal", emoji="👁️", row=row)

    async def callback(self, interaction: discord.Interaction) -> None:
        await service_of(interaction).guarded(interaction, moderation_of(interaction).reveal(interaction, self.job_id))


ITEMS = (Report, Reveal)
