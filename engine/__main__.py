"""``python -m engine``: the engine without Discord.

``generate`` makes one generation, to check the model and the GPU before going live;
``worker`` serves the shared job queue from this machine's GPU, so that several GPU machines
can serve one bot (the bot then runs with ``--no-engine``); the bot also starts one as its own
child process by default (``engine.process``).

    python -m engine generate --prompt "a red fox" --seed 7 --out fox.png
    python -m engine generate --model tiny.safetensors --prompt "a red fox" --steps 4 --width 64 --height 64 --out t.png
    python -m engine worker --config config.toml --name gpu1

It reads the ``[model]``, ``[engine]`` and ``[generation]`` sections of ``--config`` (built-in
defaults when the file is absent), loads the model, runs the job through the same worker thread
the bot uses, and writes PNGs carrying their parameters. ``--count 3`` writes ``fox.png``,
``fox-2.png``, ``fox-3.png``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from db.errors import StorageError
from engine.config.settings import (
    ConfigError,
    EngineSettings,
    GenerationSettings,
    ModelSettings,
    Settings,
    load_settings,
    parse_engine_sections,
    parse_queue_section,
    read_toml,
    resolve_device,
)
from engine.errors import EngineError
from engine.params import HIRES_UPSCALERS, SCHEDULE_NAMES
from engine.types import SAMPLER_NAMES, GenerationRequest, Progress
from ops import OpsServerError


def multiple_of_8(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 8")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="make one image (or --count images) and write PNGs")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default=None, help="negative prompt (default: generation.default_negative_prompt)")
    gen.add_argument("--seed", type=int, default=None, help="default: random (printed, and stored in the PNG)")
    gen.add_argument("--steps", type=positive_int, default=None)
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (CFG) scale")
    gen.add_argument("--width", type=multiple_of_8, default=None)
    gen.add_argument("--height", type=multiple_of_8, default=None)
    gen.add_argument("--sampler", choices=list(SAMPLER_NAMES), default=None)
    gen.add_argument(
        "--schedule", choices=list(SCHEDULE_NAMES), default=None, help="schedule type (automatic: the sampler's own)"
    )
    gen.add_argument("--init-image", type=Path, default=None, help="img2img: start from this image")
    gen.add_argument("--strength", type=unit_interval, default=None, help="img2img: 0 keeps the image, 1 ignores it")
    gen.add_argument("--count", type=positive_int, default=1, help="images, with seeds seed, seed+1, ...")
    gen.add_argument("--hires", type=float, default=None, help="hires fix: enlarge by this and denoise again")
    gen.add_argument("--hires-steps", type=int, default=None, help="hires pass steps (default: --steps)")
    gen.add_argument("--hires-upscaler", choices=list(HIRES_UPSCALERS), default=None)
    gen.add_argument("--hires-strength", type=unit_interval, default=None, help="hires pass denoising strength")
    gen.add_argument("--out", type=Path, default=Path("out.png"))
    gen.add_argument(
        "--config",
        type=Path,
        default=Path("config.toml"),
        help="config.toml to read (built-in defaults if it does not exist)",
    )
    gen.add_argument("--model", default=None, help="model source, overriding model.source in the config")
    gen.add_argument(
        "--encoders",
        default=None,
        help="an SD 3.5 / Flux.1 single file's text encoders and VAE (folder or hub id), overriding model.encoders",
    )

    work = commands.add_parser("worker", help="serve the job queue named by queue.database_url from this GPU")
    work.add_argument("--config", type=Path, default=Path("config.toml"))
    work.add_argument("--name", default="worker", help="this worker's name, unique on this machine (default: worker)")
    work.add_argument("--model", default=None, help="model source, overriding model.source in the config")
    work.add_argument(
        "--bot-link",
        type=int,
        default=None,
        metavar="FD",
        help="started by the bot (engine.process = worker): report to this file descriptor, stop when "
        "standard input closes; the bot serves [ops]",
    )
    return parser


def read_settings(args: argparse.Namespace) -> Settings:
    settings = (
        load_settings(args.config)
        if args.config.exists()
        else Settings(ModelSettings(), EngineSettings(), GenerationSettings())
    )
    if args.model:
        settings = replace(settings, model=replace(settings.model, source=args.model, name=""))
    if getattr(args, "encoders", None):
        settings = replace(settings, model=replace(settings.model, encoders=args.encoders))
    return settings


def build_request(args: argparse.Namespace, settings: Settings) -> GenerationRequest:
    from engine.families.detect import source_family  # torch-free: before the model loads

    gen = settings.generation
    found = source_family(settings.model.source, settings.model.family)
    if found is not None:  # the model's family's defaults (Flux: its steps, guidance, no negative prompt)
        gen = gen.for_family(*found, settings.model)
    return GenerationRequest(
        0,
        gen.params(
            args.prompt,
            seed=args.seed,
            negative_prompt=args.negative,
            steps=args.steps,
            guidance=args.guidance,
            size=(args.width or gen.default_width, args.height or gen.default_height),
            sampler=args.sampler,
            count=args.count,
            init_image=args.init_image.read_bytes() if args.init_image else None,
            strength=args.strength,
            schedule=args.schedule,
            hires_scale=args.hires,
            hires_steps=args.hires_steps,
            hires_upscaler=args.hires_upscaler,
            hires_strength=args.hires_strength,
        ),
    )


def output_paths(out: Path, count: int) -> list[Path]:
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(2, count + 1)]


def show_progress(progress: Progress) -> None:
    print(
        f"\rstep {progress.step}/{progress.total}",
        end="" if progress.step < progress.total else "\n",
        file=sys.stderr,
        flush=True,
    )


def generate(args: argparse.Namespace) -> int:
    from engine.families.loading import load_configured_model  # heavy imports only once the arguments are good
    from engine.serving.worker import EngineWorker

    settings = read_settings(args)
    request = build_request(args, settings)
    device, dtype = resolve_device(settings.engine)
    print(f"loading {settings.model.source} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    model = load_configured_model(settings.model, settings.engine)
    worker = EngineWorker(model, settings.engine, replace(settings.generation, max_count=max(args.count, 1)))
    worker.start()
    try:
        started = time.monotonic()
        result = worker.generate_blocking(request, on_progress=show_progress)
    finally:
        worker.stop()
    for path, image in zip(output_paths(args.out, len(result.images)), result.images, strict=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.png)
        print(f"wrote {path} (seed {image.seed})", file=sys.stderr)
    print(f"{time.monotonic() - started:.1f} s\n{result.infotext}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Claim jobs from the shared queue and run them here until SIGINT/SIGTERM."""
    from engine.serving.bot_link import BotLink

    bot_link = BotLink(args.bot_link) if args.bot_link is not None else None  # before the heavy imports
    from engine.serving.worker_process import run_worker_process
    from ops import OpsConfigError, parse_ops

    raw = read_toml(args.config)
    settings, queue_settings = parse_engine_sections(raw), parse_queue_section(raw)
    if args.model:
        settings = replace(settings, model=replace(settings.model, source=args.model, name=""))
    try:
        ops = parse_ops(raw.get("ops", {}))
    except OpsConfigError as e:
        raise ConfigError(str(e)) from None
    # The bot's child leaves [ops] to the bot, which serves this worker's figures too.
    ops_settings = None if bot_link is not None else ops
    return run_worker_process(settings, queue_settings, name=args.name, ops_settings=ops_settings, bot_link=bot_link)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.command == "worker" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return serve(args) if args.command == "worker" else generate(args)
    except (ConfigError, EngineError, StorageError, OSError, OpsServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def generate_main() -> int:
    """The ``sdbot-generate`` console script: ``python -m engine generate`` with this process's arguments."""
    return main(["generate", *sys.argv[1:]])


def worker_main() -> int:
    """The ``sdbot-worker`` console script: ``python -m engine worker`` with this process's arguments."""
    return main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
