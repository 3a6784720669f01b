"""The bot's features, one cog each; :func:`all_cogs` makes them for the client's ``setup_hook``.

Each cog gets what it needs in its constructor (the job service, the option types built from
``config.toml``); none imports another cog or the client.
"""

from __future__ import annotations

from discord.ext import commands

from bot.safety.moderation import Moderation
from bot.service import JobService
from bot.transformers import Options


def all_cogs(service: JobService, options: Options, bot: commands.Bot, moderation: Moderation) -> list[commands.Cog]:
    from bot.cogs.describe import DescribeCog
    from bot.cogs.generate import generate_cog
    from bot.cogs.help import HelpCog
    from bot.cogs.image_info import ImageInfoCog
    from bot.cogs.jobs import jobs_cog
    from bot.cogs.results import ResultsCog
    from bot.cogs.server import server_cog
    from bot.cogs.settings import settings_cog
    from bot.cogs.stats import StatsCog

    described = [DescribeCog(service)] if service.config.describe.offered else []  # where a model is set
    return [
        generate_cog(service, options),
        *described,
        jobs_cog(service, options),
        ResultsCog(service, bot),
        settings_cog(service, options),
        server_cog(service, options, moderation),
        StatsCog(service),
        HelpCog(service, bot),
        ImageInfoCog(service, bot),
    ]
