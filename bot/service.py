"""What the cogs share: admitting a job, queueing it for whoever asked, cancelling, looking up.

The cogs (:mod:`bot.cogs`) hold the commands, buttons and listeners; every flow that two of
them need lives here, below them, and is given to each cog's constructor. No cog imports
another cog or the client.

A command is journaled (:mod:`bot.journal`, a local file) before the interaction is
acknowledged, and its job is stored in the database at the same time (:mod:`bot.submitting`);
the acknowledgement waits for the store half a second at most, never on the database
beyond that: a locked or absent database is the journal's to wait out (:mod:`bot.acks`), and
the member is told so in one line. A crash in between leaves an entry that the next start
queues or answers, never a "thinking…" message with nothing behind it. A database fault on a
command's path is said in words to the member, and once in the log (not a traceback a command).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

import aiohttp
import discord

from bot import policy, render
from bot.acks import NOT_SAVED, PendingAcks
from bot.callbacks import acknowledging
from bot.checks import DISCORD_DEADLINE, mark_received, within_deadline
from bot.config import Config
from bot.delivery import Delivery
from bot.group_writes import GroupWriter
from bot.inputs import PILLOW_FORMATS, BadInput, check_prompt_text, flow_prompt_note, load_init_image
from bot.jobs import NewJob
from bot.journal import InteractionJournal, journal_path
from bot.lookups import JobLookups
from bot.masks import load_mask
from bot.permutations import PermutedSubmit
from bot.policy import Asked, Asker
from bot.prompting import image_prompts, permuted, templated
from bot.references import load_reference, show_control_maps
from bot.safety.results import ResultChecks
from bot.submitting import JournaledSubmit
from db.community import DAY, Admission, Community
from db.confirmations import Confirmations
from db.errors import QueueError
from db.faults import DatabaseHealth, is_database_fault
from db.models import Job, JobKind
from db.queue import Queue
from db.session import statement_timeout_in_this_thread
from db.styles import Styles, StyleText
from db.wildcards import Wildcards
from engine.families import FAMILIES
from engine.params import GenerationParams, job_columns

log = logging.getLogger(__name__)
T = TypeVar("T")

REROLL_EMOJI = "🔁"
#: Threads for the checks an interaction waits on (SQLite and PostgreSQL serve reads side by side).
CHECK_THREADS = 2
OUR_FAULT = "Something went wrong on our side; it has been logged."
#: PostgreSQL: seconds a statement of the checks a member waits on may take before it fails.
STATEMENT_TIMEOUT = 5.0


class JobService(JournaledSubmit, PermutedSubmit, JobLookups):
    """Admission, queueing and cancelling of jobs, for every cog."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        community: Community,
        styles: Styles,
        runner: Any | None,
        delivery: Delivery,
        acks: PendingAcks,
        *,
        clock: Callable[[], datetime],
        allowed_hosts: frozenset[str],
        checks: ResultChecks | None = None,
    ) -> None:
        """``checks``: the image policy, which uploads pass before their job is stored."""
        self.checks = checks
        self.config = config
        self.styles = styles
        self.wildcards = Wildcards(queue.engine, clock=clock)
        self.confirmations = Confirmations(queue.engine, clock=clock)  # permutations waiting for a press
        self.acks = acks
        self.queue = queue
        self.writes = GroupWriter(queue)
        self.journal = InteractionJournal(journal_path(config.queue))
        self.community = community
        self.runner = runner
        self.delivery = delivery
        self.database: DatabaseHealth = delivery.database  # one for the process: each change said once
        self.clock = clock
        self.allowed_hosts = allowed_hosts
        self._checks = concurrent.futures.ThreadPoolExecutor(
            CHECK_THREADS,
            thread_name_prefix="sdbot-checks",
            initializer=statement_timeout_in_this_thread,
            initargs=(STATEMENT_TIMEOUT,),
        )
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the journal (what a previous run left in it is replayed in the background)."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        await self.acks.start(
            self.journal,
            queue=self.queue,
            store=self._store,
            announce=self._announce,
            database=self.database,
            clock=self.clock,
        )

    async def close(self) -> None:
        await self.acks.close()
        if self._http is not None:
            await self._http.close()
        self._checks.shutdown(wait=False, cancel_futures=True)
        self.writes.close()
        await asyncio.to_thread(self.journal.shutdown)

    # -- answering interactions -------------------------------------------------------------------

    async def guarded(self, interaction: discord.Interaction, action: Coroutine[Any, Any, None]) -> None:
        """Run what a command or button does; members see refusals, we see the bugs."""
        mark_received(interaction)
        try:
            await action
        except (BadInput, QueueError) as e:
            await self.tell(interaction, str(e))
        except Exception as error:
            if not is_database_fault(error):
                log.exception("interaction %s failed", interaction.id)
                await self.tell(interaction, OUR_FAULT)
                return
            self.database.failed(error)  # said once in the log, not a traceback a command
            await self.tell(interaction, NOT_SAVED)

    async def tell(self, interaction: discord.Interaction, text: str) -> None:
        """An ephemeral reply, whether or not the interaction was answered already."""
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True)
                return
            if interaction.extras.get("thinking"):  # replace our public "thinking…" message
                await interaction.delete_original_response()
                interaction.extras["thinking"] = False
            await interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException as e:
            log.info("could not tell interaction %s: %s (%s)", interaction.id, text, e)
        finally:
            await self._answered(interaction)

    async def reply(self, interaction: discord.Interaction, text: str) -> None:
        """An ephemeral answer that mentions nobody."""
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    async def defer(self, interaction: discord.Interaction, *, job_pending: bool = False) -> None:
        """Acknowledge now with a public "thinking…" message that becomes the job's status; a
        callback that fails or is rate-limited is tried again within Discord's deadline.

        ``job_pending``: the checks are still running, so the interaction is journaled first
        (:mod:`bot.journal`), and answered after a restart if the bot dies before its job is
        stored.
        """
        if interaction.response.is_done():
            return
        if job_pending and not interaction.extras.get("journaled"):
            interaction.extras["journaled"] = True
            await self._journaled(interaction, self.journal.append(self.acks.entry(interaction, self.clock())))
        received = interaction.extras.get("received", time.monotonic())
        with acknowledging(received + DISCORD_DEADLINE):
            response = await interaction.response.defer(thinking=True)
        interaction.extras["thinking"] = True
        interaction.extras["message_id"] = getattr(response, "message_id", None)

    async def run_check(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` (a database read, a token count) on the bot's checking threads.

        An interaction waits on these, under Discord's 3-second deadline, so they do not queue
        behind the background work (delivery, the runner, writes) in asyncio's shared pool.
        """
        return await asyncio.get_running_loop().run_in_executor(self._checks, functools.partial(function, *args))

    # -- admission --------------------------------------------------------------------------------

    async def admission(self, asker: Asker) -> Admission:
        """The member's defaults, the server's policy and the member's standing: one read."""
        return await self.run_check(self.community.admission, asker.guild_id, asker.user_id, self.clock() - DAY)

    def gate(self, asker: Asker, seen: Admission, params: GenerationParams) -> None:
        policy.hires_gate(params, seen.policy, self.config.generation_for(params.model))
        policy.edit_model_gate(params, self.config.discord.edit_model)
        policy.gate(asker, seen, params, pending_limit=self.config.queue.pending_limit, now=self.clock())

    async def admit(
        self,
        interaction: discord.Interaction,
        asked: Asked,
        image: discord.Attachment | None = None,
        mask: discord.Attachment | None = None,
        reference: discord.Attachment | None = None,
    ) -> tuple[GenerationParams, str | None]:
        """The parameters of a new /imagine or /img2img job and a note on long prompts; refuses,
        with BadInput, what the server, the queue's pending limit or the engine would not take.
        Within Discord's deadline: acknowledges first when the checks take long."""
        return await within_deadline(self, interaction, self._admit(interaction, asked, image, mask, reference))

    async def _admit(
        self,
        interaction: discord.Interaction,
        asked: Asked,
        image: discord.Attachment | None,
        mask: discord.Attachment | None,
        reference: discord.Attachment | None = None,
    ) -> tuple[GenerationParams, str | None]:
        asker = Asker.of(interaction)
        if image is None and reference is None:  # every check in one hop to the checking threads
            return await self.run_check(self._checked, asker, asked)
        seen, params = await self.run_check(self._resolved, asker, asked, image is not None)
        if image is None:  # a reference (bot/references.py): checked as an /img2img upload is
            params = await load_reference(self, reference, asked, seen.policy, params)
            uploads = [unit.image for unit in params.control_units]
            if self.checks is not None:
                await self.checks.check_upload(uploads, seen.policy, age_restricted=policy.is_nsfw_channel(asker))
            return await self.run_check(self._gated, asker, seen, params)
        gen = self.config.generation_for(params.model)
        dc = self.config.discord  # the upload's shape, within this server's size limit
        data = await self.download(image.url, dc.max_attachment_bytes)
        max_width, max_height = policy.max_size(seen.policy, gen)
        init = await asyncio.to_thread(
            load_init_image,
            data,
            size=params.size if asked.aspect else asked.size,  # --ar: the ratio's size, not the upload's
            max_width=max_width,
            max_height=max_height,
            target_area=gen.default_width * gen.default_height,
            formats=tuple(PILLOW_FORMATS[t] for t in dc.allowed_image_types),
            multiple=gen.pixel_multiple,
        )
        params = params.but(init_image=init.png, width=init.width, height=init.height)
        if mask is not None:  # resized to the image; white (or transparent) means change
            mask_png = await asyncio.to_thread(
                load_mask, await self.download(mask.url, dc.max_attachment_bytes), (init.width, init.height)
            )
            params = params.but(mask=mask_png)
        if self.checks is not None:  # a flagged upload is refused here, before any job is stored
            uploads = [init.png] if mask is None else [init.png, params.mask]
            await self.checks.check_upload(uploads, seen.policy, age_restricted=policy.is_nsfw_channel(asker))
        return await self.run_check(self._gated, asker, seen, params)

    def _checked(self, asker: Asker, asked: Asked) -> tuple[GenerationParams, str | None]:
        """:meth:`_resolved`, then :meth:`_gated` (on a checking thread)."""
        seen, params = self._resolved(asker, asked, False)
        return self._gated(asker, seen, params)

    def _resolved(self, asker: Asker, asked: Asked, img2img: bool) -> tuple[Admission, GenerationParams]:
        """The member's standing, and what they asked for with every default and the style applied."""
        seen = self.community.admission(asker.guild_id, asker.user_id, self.clock() - DAY)
        params = policy.resolve(
            asked,
            seen.defaults,
            seen.policy,
            self.config.generation,
            self.config.model_names,
            img2img=img2img,
            model_clip_skip=lambda model: self.config.model_settings(model).clip_skip,
            generation_for=self.config.generation_for,
        )
        params = self._styled(asker, asked.style, params)
        guild = asker.guild_id  # Dynamic Prompts' variants and the server's wildcards (none in DMs)
        lists = (lambda names: {}) if guild is None else functools.partial(self.wildcards.lines, guild)
        return seen, templated(params, lists, lambda: [] if guild is None else self.wildcards.names(guild))

    def _gated(self, asker: Asker, seen: Admission, params: GenerationParams) -> tuple[GenerationParams, str | None]:
        """``params`` past the server's rules and the pending limit, with the long-prompt note."""
        self.gate(asker, seen, params)
        lora_dir = self.config.model_settings(params.model).lora_dir
        notes = {check_prompt_text(prompt, params.negative_prompt, lora_dir) for prompt in image_prompts(params)}
        traits = FAMILIES.get(self.config.generation_for(params.model).family)
        if traits is not None and traits.flow:  # CLIP's chunks do not apply; A1111's emphasis neither
            notes = {flow_prompt_note(prompt, traits.label) for prompt in image_prompts(params)}
        return params, max(notes - {None}, default=None)

    def _styled(self, asker: Asker, name: str | None, params: GenerationParams) -> GenerationParams:
        """``params`` with the named style (else the member's default style here) applied."""
        if asker.guild_id is None:
            if name is not None:
                raise BadInput("Styles belong to a server; use them there.")
            return params
        style = self._style_for(asker.guild_id, asker.user_id, name)
        if style is None:
            return params
        prompt, negative = style.apply(params.prompt, params.negative_prompt)
        return params.but(prompt=prompt, negative_prompt=negative)

    def _style_for(self, guild_id: int, user_id: int, name: str | None) -> StyleText | None:
        style = self.styles.chosen(guild_id, user_id, name)
        if style is None and name is not None:
            known = ", ".join(self.styles.names(guild_id)[:25]) or "none yet (`/server style add`)"
            raise BadInput(f"This server has no style called `{render.escape(name)}`; styles: {known}.")
        return style  # a default style removed since is simply not applied

    async def admit_derived(self, interaction: discord.Interaction, new: NewJob) -> NewJob:
        """The server's policy and the pending limit for a job made by a button or the Edit form."""
        asker = Asker.of(interaction)

        async def check() -> None:
            self.gate(asker, await self.admission(asker), new.params)

        await within_deadline(self, interaction, check())
        return new

    # -- queueing ---------------------------------------------------------------------------------

    async def submit_command(
        self,
        interaction: discord.Interaction,
        kind: JobKind,
        asked: Asked,
        image: discord.Attachment | None = None,
        mask: discord.Attachment | None = None,
        *,
        reference: discord.Attachment | None = None,
    ) -> Job | None:
        """/imagine, /img2img and /inpaint: admit, then queue (permutations: each of their jobs)."""
        prompts = permuted(asked.prompt)
        if len(prompts) > 1:
            if reference is not None:
                raise BadInput("A reference guides one prompt; leave the {a, b} choices out or the reference.")
            await self.submit_permutations(interaction, kind, asked, prompts)
            return None
        asked = self.read_params(replace(asked, prompt=prompts[0]))
        params, note = await self.admit(interaction, asked, image, mask, reference)
        job = await self.submit(interaction, NewJob(kind, params), note=note)
        if job is not None:  # queued (else from the journal, later): the reply previews its control maps
            await show_control_maps(interaction, params)
        return job

    async def submit_derived(self, interaction: discord.Interaction, new: NewJob, note: str | None = None) -> Job:
        """A reroll, variation, upscale or edit: admit, then queue."""
        return await self.submit(interaction, await self.admit_derived(interaction, new), note=note)

    async def submit_for_reaction(
        self,
        payload: discord.RawReactionActionEvent,
        new: NewJob,
        channel: discord.abc.Messageable,
        cached_channel: Any,
    ) -> Job | None:
        """Queue a job for a member who reacted; its status is a new message in the channel.
        A refusal has no private reply to go to: it is logged and nothing happens."""
        asker = Asker(payload.guild_id, payload.user_id, payload.channel_id, cached_channel)
        try:
            self.gate(asker, await self.admission(asker), new.params)
        except BadInput as e:
            log.info("reaction reroll by %s refused: %s", payload.user_id, e)
            return None
        status = await channel.send(f"{REROLL_EMOJI} <@{payload.user_id}> is rerolling job #{new.parent_id}…")
        try:
            job = await asyncio.to_thread(
                self.queue.enqueue,
                **job_columns(new.params),
                kind=new.kind,
                parent_id=new.parent_id,
                requester_id=payload.user_id,
                guild_id=payload.guild_id,
                channel_id=payload.channel_id,
                status_message_id=status.id,
                status_channel_id=payload.channel_id,
            )
        except QueueError as e:
            await status.edit(content=f"{REROLL_EMOJI} <@{payload.user_id}>: {render.escape(str(e))}")
            return None
        await self._announce(job, None)
        return job

    async def _announce(self, job: Job, note: str | None, position: int | None = None) -> None:
        if position is None:
            position = await asyncio.to_thread(self.queue.position, job.id)
        try:
            await self.delivery.show_queued(job, position, note or "")
        except discord.HTTPException as e:  # the job is queued; its status will be shown later
            log.info("job %s: could not show its place in line (%s)", job.id, e)
        self.delivery.wake()
        if self.runner is not None:
            self.runner.wake()

    def wake_workers(self) -> None:
        """Jobs may start now (a server resumed): wake this process's runner and the others."""
        self.queue.notify_new_job()
        if self.runner is not None:
            self.runner.wake()

    async def download(self, url: str, max_bytes: int) -> bytes:
        """An attachment's bytes, refusing more than ``max_bytes`` whatever its declared size."""
        assert self._http is not None, "start() has not run"
        try:
            async with self._http.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise BadInput("The attachment could not be downloaded; upload it again.")
                data = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > max_bytes:
                        raise BadInput(f"The image is larger than {max_bytes / 1048576:.1f} MiB.")
                return bytes(data)
        except (TimeoutError, aiohttp.ClientError):
            raise BadInput("The attachment could not be downloaded; upload it again.") from None
