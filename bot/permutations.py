"""Midjourney's permutations: ``/imagine a {red, blue} car`` queues a job for each choice.

Each job is admitted as the one command would be (its own ``--parameters``, the member's
defaults, the style, wildcards, every server rule) and all of them are counted against the
member's limits before any is stored: the whole set is queued, or none. Each job gets its own
status message in the channel (as a reaction's reroll does), and the command's answer lists them.

More jobs than the server's images-per-job limit are queued only once the member presses
**Queue them**: what they asked waits in the database (:mod:`db.confirmations`), the button's
``custom_id`` names it (``sd:permute:<id>``), so the press works after a restart, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Self

import discord
from discord import ButtonStyle, ui

from bot import render
from bot.checks import within_deadline
from bot.inputs import BadInput
from bot.jobs import NewJob
from bot.policy import Asked, Asker
from bot.prompt_params import read_prompt_params
from bot.prompting import permuted
from bot.reach import service_of
from db.community import Admission
from db.confirmations import Confirmations
from db.errors import QueueError
from db.models import Job, JobKind
from db.queue import Queue
from engine.params import GenerationParams, job_columns
from engine.prompt_templates import escape

log = logging.getLogger(__name__)

PERMUTE_EMOJI = "🔀"


class QueueThem(ui.DynamicItem[ui.Button], template=r"sd:permute:(?P<id>\d+)"):
    """The button under "this makes N jobs": queues them for the member who asked, once."""

    def __init__(self, confirmation_id: int, count: int = 0) -> None:
        label = f"Queue {count} jobs" if count else "Queue them"
        super().__init__(ui.Button(label=label, emoji=PERMUTE_EMOJI, style=ButtonStyle.primary,
                                   custom_id=f"sd:permute:{confirmation_id}"))  # fmt: skip
        self.confirmation_id = confirmation_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match: re.Match[str]) -> Self:
        return cls(int(match["id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        service = service_of(interaction)
        await service.guarded(interaction, service.confirm_permutations(interaction, self.confirmation_id))


def asked_to_json(asked: Asked) -> dict[str, Any]:
    return dataclasses.asdict(asked)


def asked_from_json(values: dict[str, Any]) -> Asked:
    known = {f.name for f in dataclasses.fields(Asked)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    prompt = values.pop("prompt")
    return Asked(prompt, **values)


class PermutedSubmit:
    """The part of the job service that queues a permuted prompt's jobs (mixed into JobService)."""

    config: Any
    queue: Queue
    confirmations: Confirmations
    admission: Callable[[Asker], Awaitable[Admission]]
    run_check: Callable[..., Awaitable[Any]]
    gate: Callable[[Asker, Admission, GenerationParams], None]
    defer: Callable[..., Awaitable[None]]
    _resolved: Callable[[Asker, Asked, bool], tuple[Admission, GenerationParams]]
    _gated: Callable[[Asker, Admission, GenerationParams], tuple[GenerationParams, str | None]]
    _announce: Callable[[Job, str | None, int | None], Awaitable[None]]
    _answered: Callable[[discord.Interaction], Awaitable[None]]
    admit: Callable[..., Awaitable[tuple[GenerationParams, str | None]]]
    submit: Callable[..., Awaitable[Job | None]]

    async def submit_prompt(self, interaction: discord.Interaction, prompt: str) -> None:
        """A new /imagine job of ``prompt`` (a /describe result's) as its words, for whoever pressed."""
        params, note = await self.admit(interaction, Asked(escape(prompt)))
        await self.submit(interaction, NewJob(JobKind.txt2img, params), note=note)

    def read_params(self, asked: Asked) -> Asked:
        """``asked`` with Midjourney's ``--parameters`` taken off its prompt (bot.prompt_params)."""
        gen = self.config.generation
        return read_prompt_params(asked, max_steps=gen.max_steps, max_guidance=gen.max_guidance)

    async def submit_permutations(
        self,
        interaction: discord.Interaction,
        kind: JobKind,
        asked: Asked,
        prompts: list[str],
        *,
        confirmed: bool = False,
    ) -> list[Job]:
        """Queue one job per prompt, or ask first when they are more than one command's images."""
        if kind is not JobKind.txt2img:
            raise BadInput("Permutations `{a, b}` make several jobs from /imagine only; upload one image per job here.")
        each = [self.read_params(dataclasses.replace(asked, prompt=prompt)) for prompt in prompts]
        asker = Asker.of(interaction)
        checked = await within_deadline(self, interaction, self.run_check(self._admitted, asker, each))
        seen, jobs = checked
        most = seen.policy.max_count or self.config.generation.max_count
        if len(jobs) > most and not confirmed:
            await self._ask_first(interaction, asked, jobs)
            return []
        return await self._queue_all(interaction, kind, jobs)

    def _admitted(self, asker: Asker, each: list[Asked]) -> tuple[Admission, list[GenerationParams]]:
        """Every job's parameters past every rule, as if each were queued after the ones before."""
        jobs = []
        seen = None
        for asked in each:
            seen, params = self._resolved(asker, asked, False)
            jobs.append(params)
        assert seen is not None
        limit = min(x for x in (self.config.queue.pending_limit, seen.policy.pending_limit) if x is not None)
        if seen.pending + len(jobs) > limit:
            raise BadInput(
                f"These permutations make {len(jobs)} jobs, and you may have {limit} waiting "
                f"(you have {seen.pending}): use fewer choices, or wait for your jobs to finish."
            )
        daily = seen.policy.daily_limit
        if daily is not None and asker.guild_id is not None and seen.usage.count + len(jobs) > daily:
            left = max(0, daily - seen.usage.count)
            raise BadInput(
                f"These permutations make {len(jobs)} jobs; this server's limit leaves you {left} "
                "in these 24 hours: use fewer choices."
            )
        for n, params in enumerate(jobs):
            usage = dataclasses.replace(seen.usage, count=seen.usage.count + n)
            self._gated(asker, dataclasses.replace(seen, pending=seen.pending + n, usage=usage), params)
        return seen, jobs

    async def _ask_first(self, interaction: discord.Interaction, asked: Asked, jobs: list[GenerationParams]) -> None:
        confirmation_id = await self.run_check(
            self.confirmations.add,
            interaction.user.id,
            interaction.guild_id,
            interaction.channel_id,
            asked_to_json(asked),
        )
        listed = "\n".join(f"{n}. {render.excerpt(p.prompt)}" for n, p in enumerate(jobs[:10], 1))
        more = f"\n… and {len(jobs) - 10} more" if len(jobs) > 10 else ""
        view = ui.View(timeout=None)
        view.add_item(QueueThem(confirmation_id, len(jobs)))
        text = f"{PERMUTE_EMOJI} This prompt's permutations make **{len(jobs)} jobs**:\n{listed}{more}\nQueue them all?"
        text, none = render.clip(text, 2000), discord.AllowedMentions.none()
        if interaction.response.is_done():  # the checks took long: the "thinking…" message asks
            await interaction.edit_original_response(content=text, view=view, allowed_mentions=none)
            interaction.extras["thinking"] = False
        else:
            await interaction.response.send_message(text, view=view, ephemeral=True, allowed_mentions=none)
        await self._answered(interaction)  # answered: a restart does not answer it again

    async def confirm_permutations(self, interaction: discord.Interaction, confirmation_id: int) -> None:
        """The **Queue them** button: the stored command, admitted again now and queued."""
        asked = await self.run_check(self.confirmations.take, confirmation_id, interaction.user.id)
        if asked is None:
            raise BadInput("These permutations were queued already, or asked by someone else, or too long ago.")
        try:
            stored = asked_from_json(asked)
            await self.submit_permutations(
                interaction, JobKind.txt2img, stored, permuted(stored.prompt), confirmed=True
            )
        except BaseException:
            await self.run_check(self.confirmations.release, confirmation_id)
            raise

    async def _queue_all(
        self, interaction: discord.Interaction, kind: JobKind, jobs: list[GenerationParams]
    ) -> list[Job]:
        """A status message in the channel for each job, then all of them stored in one transaction."""
        await self.defer(interaction)
        channel = interaction.channel
        user = interaction.user.id
        statuses = []
        for n, params in enumerate(jobs, 1):
            text = f"{PERMUTE_EMOJI} <@{user}> permutation {n}/{len(jobs)}: {render.excerpt(params.prompt)}"
            statuses.append(await channel.send(text, allowed_mentions=discord.AllowedMentions.none()))
        rows = [
            {**job_columns(params), "kind": kind, "requester_id": user, "guild_id": interaction.guild_id,
             "channel_id": interaction.channel_id, "status_message_id": status.id,
             "status_channel_id": interaction.channel_id}
            for params, status in zip(jobs, statuses, strict=True)
        ]  # fmt: skip
        try:
            stored = await asyncio.to_thread(self.queue.enqueue_many, rows)
        except Exception:  # the database did not take them: say so where they were announced
            for status in statuses:
                with contextlib.suppress(discord.HTTPException):
                    await status.edit(content=f"{PERMUTE_EMOJI} <@{user}>: not queued (the database is away).")
            raise
        queued = []
        for result, status in zip(stored, statuses, strict=True):
            if isinstance(result, QueueError):
                await status.edit(content=f"{PERMUTE_EMOJI} <@{user}>: {render.escape(str(result))}")
                continue
            queued.append(result)
            await self._announce(result, None)
        titles = ", ".join(f"#{job.id}" for job in queued)
        await interaction.edit_original_response(
            content=f"{PERMUTE_EMOJI} Queued {len(queued)} of {len(jobs)} permutation jobs: {titles}."
        )
        interaction.extras["thinking"] = False
        await self._answered(interaction)
        return queued
