"""The Discord client: a thin ``commands.Bot`` that loads the cogs and keeps the background tasks.

``SDBot`` is made by :mod:`bot.wiring` with the configuration, the queue and the state store,
then given the job service, the delivery loop and the queue runner (``attach``); delivery
reaches Discord through it by a narrow Protocol (:mod:`bot.delivery.ports`), so neither imports
the other's module for more than that. It does its asynchronous set-up in ``setup_hook``: the
cogs (:mod:`bot.cogs`), the command sync when the commands changed (:mod:`bot.sync`), and the
background tasks. Each task is supervised: an exception is logged
with its traceback and the task starts again after a pause; one that keeps failing stops the
bot with an error (``python -m bot`` then exits 1, so a service manager restarts it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import discord
from discord.ext import commands

from bot.cogs import all_cogs
from bot.config import Config
from bot.delivery import Delivery
from bot.inputs import BadInput, limit_pillow, warm_up_token_counter
from bot.safety.moderation import Moderation
from bot.service import OUR_FAULT, JobService
from bot.sync import sync_commands
from bot.transformers import Options
from db.queue import Queue
from db.state import StateStore

log = logging.getLogger(__name__)

#: Seconds the background tasks get to stop (running jobs are handed back to the queue).
CLOSE_TIMEOUT = 30.0
#: Pauses before a crashed background task starts again; past the last, the bot gives up.
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 30.0, 30.0, 30.0)
#: A task that ran this long before failing was healthy: its restarts count from zero again.
HEALTHY_SECONDS = 300.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class SDBot(commands.Bot):
    """A Stable Diffusion bot for one or more Discord servers."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        state: StateStore,
        *,
        clock: Callable[[], datetime] = utcnow,
        force_sync: bool = False,
        **options: Any,
    ) -> None:
        """``config``: as the loaded model's family makes it (``bot.wiring``); ``state``: where the
        command sync's hash and the pending acknowledgements are kept."""
        intents = discord.Intents.none()
        intents.guilds = True  # channels and permissions
        intents.guild_reactions = True  # 🔁 rerolls
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.config = config
        self.queue = queue
        self.state = state
        self.clock = clock
        self.force_sync = force_sync
        self.fatal: BaseException | None = None  # why a background task gave up, for the exit status
        self._tasks: list[asyncio.Task] = []
        limit_pillow()

    def attach(self, service: JobService, delivery: Delivery, runner: Any | None, moderation: Moderation) -> None:
        """What the client serves: the job service (for the cogs and the buttons), the delivery
        loop and the queue runner (or None), started in ``setup_hook``, and the image policy's
        moderation (Report, Reveal, ``/server review``). They are made after the client because
        delivery talks to Discord through it (``bot.delivery.ports``)."""
        self.service, self.delivery, self.runner, self.moderation = service, delivery, runner, moderation

    def interaction_webhook(self, app_id: int, token: str) -> discord.Webhook:
        """The webhook of an interaction, to edit its original response (delivery's status messages)."""
        return discord.Webhook.partial(app_id, token, client=self)

    # -- start and stop ---------------------------------------------------------------------

    async def setup_hook(self) -> None:
        # The prompt token counter takes about a second to build: now, beside the command sync,
        # and done before the gateway connects, so that no member's first command waits on it.
        warm_up = asyncio.get_running_loop().run_in_executor(None, warm_up_token_counter)
        for cog in all_cogs(self.service, Options.of(self.config), self, self.moderation):
            await self.add_cog(cog)
        self.tree.on_error = self.on_app_command_error
        await sync_commands(self.tree, self.state, self.config.discord.guild_ids, force=self.force_sync)
        # Jobs queued for a model that has left config.toml since would wait for ever: they fail
        # now, with a reason that delivery posts to their members.
        await asyncio.to_thread(self.queue.fail_unknown_models, self.config.model_names)
        await self.service.start()
        await self.service.acks.answer_stranded(self, self.clock())
        try:
            await warm_up
        except Exception:  # counted on first use instead
            log.exception("the prompt token counter could not be built")
        self.start_task(self.delivery.run, "delivery")
        if self.runner is not None:
            self.start_task(self.runner.run, "queue-runner")

    def task(self, name: str) -> asyncio.Task | None:
        """The background task called ``name`` (for the health check), None before it starts."""
        return next((t for t in self._tasks if t.get_name() == name), None)

    @property
    def connected(self) -> bool:
        """Whether the gateway connection is up now (``is_ready`` stays true across reconnects)."""
        return self.is_ready() and not self.is_closed() and self.ws is not None and self.ws.open

    def start_task(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> asyncio.Task:
        """Run ``run()`` in the background for as long as the bot runs, restarting it after a
        crash (see :data:`RESTART_DELAYS`)."""
        task = asyncio.create_task(self._supervise(run, name), name=name)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)
        return task

    async def _supervise(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        failures = 0
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await run()
                log.warning("background task %s ended; starting it again", name)
            except Exception:
                if asyncio.get_running_loop().time() - started > HEALTHY_SECONDS:
                    failures = 0
                if failures >= len(RESTART_DELAYS):
                    raise
                log.exception("background task %s failed; starting it again in %g s", name, RESTART_DELAYS[failures])
                await asyncio.sleep(RESTART_DELAYS[failures])
                failures += 1

    def _task_ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.critical("background task %s keeps failing; stopping the bot", task.get_name(), exc_info=task.exception())
        self.fatal = task.exception()
        asyncio.get_running_loop().create_task(self.close(), name="close-after-failure")

    async def close(self) -> None:
        """Stop the background tasks (running jobs go back in line), then disconnect."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                log.error("background task %s did not stop within %s s", task.get_name(), CLOSE_TIMEOUT)
        self._tasks.clear()
        await self.service.close()
        await super().close()

    # -- errors -----------------------------------------------------------------------------

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: discord.app_commands.AppCommandError
    ) -> None:
        if isinstance(error, discord.app_commands.CommandInvokeError):
            error = error.original
        if isinstance(error, BadInput):
            await self.service.tell(interaction, str(error))
        elif isinstance(error, discord.app_commands.TransformerError):
            await self.service.tell(interaction, f"`{error.value}` is not a valid value here.")
        else:
            log.error("command failed", exc_info=error)
            await self.service.tell(interaction, OUR_FAULT)
