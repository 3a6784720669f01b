"""``python -m bot [--config config.toml] [--no-engine]``: run the Discord bot.

Reads the configuration (a wrong value: one line and exit status 2; no ``DISCORD_TOKEN``: what
to do and exit 2), creates or upgrades the database, starts the engine and waits for its model
(a model that will not load: one line and exit 1), and connects to Discord. The engine is the
child process ``python -m engine worker`` (``engine.process = "worker"``, the default:
:mod:`bot.engine_process`) or a worker thread and queue runner in this process (``"bot"``).
SIGINT/SIGTERM stop cleanly: queued jobs stay in the database, and a job that was running goes
back in line (or is queued again by lease recovery after a crash).
``--no-engine`` runs the bot without a local GPU, when workers run in other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import discord

from bot.config import Config, ConfigError, load_config

log = logging.getLogger("bot")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")
    parser.add_argument(
        "--no-engine", action="store_true", help="do not load a model here; GPU worker processes serve the queue"
    )
    parser.add_argument(
        "--sync", action="store_true", help="register the slash commands with Discord even if they have not changed"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(run(config, engine=not args.no_engine, sync=args.sync, config_path=args.config))


async def run(config: Config, *, engine: bool = True, sync: bool = False, config_path: str = "config.toml") -> int:
    """Wire database, engine and client together (:mod:`bot.wiring`); return the exit status.
    ``config_path``: the file ``config`` was read from, which the engine process reads too."""
    from bot.engine_process import EngineProcess, EngineStartError
    from bot.wiring import build_bot, load_engine, open_database
    from db.errors import StorageError
    from ops import OpsServerError

    safety_check = None
    if config.safety.enabled:  # a missing or broken classifier stops the start, in one line
        from bot.safety.classifier import ClassifierError
        from bot.wiring import load_safety

        try:
            safety_check = await asyncio.to_thread(load_safety, config)
        except ClassifierError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:
        db, queue = await asyncio.to_thread(open_database, config)
    except StorageError as e:  # a read-only database file or folder: one line, what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    worker = family = child = None
    if engine and config.engine.process == "worker":
        child = EngineProcess(Path(config_path).resolve(), stopping=stop.is_set)
        try:
            family = await child.start()
        except EngineStartError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.status if e.status > 0 else 1  # killed by a signal: 1
    elif engine:
        from engine.errors import ModelLoadError

        try:
            worker, family = await asyncio.to_thread(load_engine, config)
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ConfigError as e:  # e.g. engine.device = "cuda" on a machine without one
            print(f"error: {e}", file=sys.stderr)
            return 2
    app = build_bot(
        config, queue, worker, engine_process=child, model_family=family, safety_check=safety_check, force_sync=sync
    )
    bot = app.bot
    if worker is not None:
        worker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if config.ops.enabled:
            await app.ops.start()  # a taken port: OpsServerError, one line
            log.info("health and metrics at %s/healthz and /metrics", app.ops.url)
        async with bot:
            client_task = asyncio.create_task(bot.start(config.token), name="discord-client")
            stop_task = asyncio.create_task(stop.wait(), name="stop-signal")
            done, _ = await asyncio.wait({client_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if client_task in done:
                client_task.result()  # raises LoginFailure and friends
            log.info("stopping: queued jobs stay in the database")
    except discord.LoginFailure:
        print(
            "error: Discord refused DISCORD_TOKEN; copy the bot token again from the developer portal "
            "(Bot > Reset Token)",
            file=sys.stderr,
        )
        return 2
    except discord.PrivilegedIntentsRequired:
        print(
            "error: Discord refused the intents; the bot needs no privileged intents, check its settings",
            file=sys.stderr,
        )
        return 2
    except OpsServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        await app.ops.stop()
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        if child is not None:
            await child.stop()  # its running jobs go back in line
        queue.close()
        db.dispose()
    if bot.fatal is not None:
        print(
            f"error: a background task kept failing ({type(bot.fatal).__name__}: {bot.fatal}); "
            "see the log above. Restart the bot (a service manager does it for you).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
