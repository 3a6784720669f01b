"""How a button, a form or an autocomplete reaches the job service.

discord.py makes a pressed button from its ``custom_id`` (``DynamicItem.from_custom_id``), so it
cannot be given the service in a constructor: it finds it on ``interaction.client``. What it
may use there is :class:`ButtonService`, a Protocol of the service's few calls that buttons
make; :func:`service_of` checks at run time that the client carries one. No module here imports
:mod:`bot.service` (which imports delivery, which lays out these buttons): no import circle,
not even for types.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

import discord

from bot.checks import Defers
from bot.config import Config
from bot.jobs import NewJob
from bot.policy import Asked
from db.models import Job, JobKind, ResultImage
from db.styles import Styles

T = TypeVar("T")


class ButtonService(Defers, Protocol):
    """The job service's calls that buttons, forms and autocompletes make."""

    config: Config
    styles: Styles

    async def guarded(self, interaction: discord.Interaction, action: Coroutine[Any, Any, None]) -> None: ...

    async def run_check(self, function: Callable[..., T], *args: Any) -> T: ...

    async def get_job(self, job_id: int) -> Job | None: ...

    async def get_image(self, job_id: int, index: int) -> ResultImage: ...

    async def submit_derived(self, interaction: discord.Interaction, new: NewJob, note: str | None = None) -> Job: ...

    async def submit_command(
        self,
        interaction: discord.Interaction,
        kind: JobKind,
        asked: Asked,
        *,
        reference: discord.Attachment | None = None,
    ) -> Job | None: ...

    async def cancel(self, interaction: discord.Interaction, job: Job) -> None: ...

    async def show_info(self, interaction: discord.Interaction, job: Job) -> None: ...

    async def confirm_permutations(self, interaction: discord.Interaction, confirmation_id: int) -> None: ...

    async def submit_prompt(self, interaction: discord.Interaction, prompt: str) -> None: ...


@runtime_checkable
class ServesJobs(Protocol):
    """A client that carries the job service (``bot.client.SDBot``)."""

    service: ButtonService


class ModerationButtons(Protocol):
    """What the image policy's buttons (Report, Reveal) call: ``bot.safety.moderation.Moderation``."""

    async def report(self, interaction: discord.Interaction, job_id: int) -> None: ...

    async def reveal(self, interaction: discord.Interaction, job_id: int) -> None: ...


@runtime_checkable
class ModeratesImages(Protocol):
    """A client that carries the image policy's moderation (``bot.client.SDBot``)."""

    moderation: ModerationButtons


def moderation_of(interaction: discord.Interaction) -> ModerationButtons:
    """The image moderation of the client that received ``interaction``."""
    client = interaction.client
    if not isinstance(client, ModeratesImages):
        raise TypeError(f"{type(client).__name__} carries no image moderation")
    return client.moderation


def service_of(interaction: discord.Interaction) -> ButtonService:
    """The job service of the client that received ``interaction``."""
    client = interaction.client
    if not isinstance(client, ServesJobs):
        raise TypeError(f"{type(client).__name__} carries no job service")
    return client.service
