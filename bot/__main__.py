"""``python -m bot [--config config.toml] [--no-engine]``: run the Discord bot.

Reads the configuration (a wrong value: one line and exit status 2; no ``DISCORD_TOKEN``: what
to do and exit 2), creates or upgrades the database, loads the model (a model that will not
load: one line and exit 1), starts the engine worker and the queue runner, and connects to
Discord. SIGINT/SIGTERM stop cleanly: queued jobs stay in the database, and a job that was
running goes back in line (or is queued again by lease recovery after a crash).
``--no-engine`` runs the bot without a local GPU, when workers run in other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import discord

from bot.config import Config, ConfigError, load_config

log = logging.getLogger("bot")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")
    parser.add_argument("--no-engine", action="store_true",
                        help="do not load a model here; GPU worker processes serve the queue")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(run(config, engine=not args.no_engine))


async def run(config: Config, *, engine: bool = True) -> int:
    """Wire database, engine and client together; return the exit status."""
    from db.queue import Queue
    from db.session import make_engine, upgrade

    db = make_engine(config.queue.database_url)
    await asyncio.to_thread(upgrade, db)
    queue = Queue(db, pending_limit=config.queue.pending_limit, max_attempts=config.queue.max_attempts,
                  lease_seconds=config.queue.lease_seconds)
    worker = runner = tokenizer = family = None
    if engine:
        from engine.errors import ModelLoadError

        try:
            worker, tokenizer, family = await asyncio.to_thread(_load_engine, config)
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ConfigError as e:  # e.g. engine.device = "cuda" on a machine without one
            print(f"error: {e}", file=sys.stderr)
            return 2
        from engine.models import ModelTurns
        from engine.runner import QueueRunner, worker_identity

        # Jobs our previous run left running go back in line now, not when their lease ends.
        worker_id, prefix = worker_identity("bot")
        recovered = await asyncio.to_thread(queue.recover_all_running, worker_prefix=prefix)
        if recovered:
            log.info("%d job(s) left running by a previous run were recovered", recovered)
        worker.start()
        runner = QueueRunner(queue, worker, worker_id=worker_id, max_in_flight=config.engine.max_batch,
                             heartbeat_interval=config.queue.lease_seconds / 4,
                             listen=config.queue.database_url.startswith("postgresql"),
                             turns=ModelTurns.for_pool(worker.models, config.engine))

    from bot.client import SDBot

    bot = SDBot(config, queue, runner, tokenizer=tokenizer, model_family=family)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with bot:
            client_task = asyncio.create_task(bot.start(config.token), name="discord-client")
            stop_task = asyncio.create_task(stop.wait(), name="stop-signal")
            done, _ = await asyncio.wait({client_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if client_task in done:
                client_task.result()  # raises LoginFailure and friends
            log.info("stopping: queued jobs stay in the database")
    except discord.LoginFailure:
        print("error: Discord refused DISCORD_TOKEN; copy the bot token again from the developer portal "
              "(Bot > Reset Token)", file=sys.stderr)
        return 2
    except discord.PrivilegedIntentsRequired:
        print("error: Discord refused the intents; the bot needs no privileged intents, check its settings",
              file=sys.stderr)
        return 2
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        queue.close()
        db.dispose()
    return 0


def _load_engine(config: Config):  # -> tuple[EngineWorker, tokenizer | None, family]
    """Load the model (slow: runs in a thread) and make the engine worker.

    The loaded default model's family (``"sdxl"``: SDXL's sizes, see ``generation.sdxl_sizes``)
    sets the worker's size limits (EngineWorker does it) and the bot's commands (through ``SDBot``)."""
    from engine.models import ModelPool
    from engine.worker import EngineWorker

    models = (config.model, *config.models)
    worker = EngineWorker(ModelPool.configured(models, config.engine), config.engine, config.generation)
    model = worker.pipeline.model  # the default model, loaded now so that a bad one stops the start
    tokenizer = model.tokenizers[0] if model.tokenizers else None
    return worker, tokenizer, model.info.family


if __name__ == "__main__":
    sys.exit(main())
