"""The engine's part of ``config.toml``: ``[model]``, ``[models.<name>]``, ``[engine]``, ``[generation]``.

Parsed once into frozen dataclasses and passed in. Every check names the key, the value and
what is allowed, so a wrong value gives one clear line and nothing starts half-configured.
The bot's own sections are parsed in ``bot/config.py``; ``python -m engine`` reads only these.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.settings import QueueSettings
from engine.config.describe_settings import DescribeSettings, parse_describe
from engine.config.model_settings import ModelSettings, parse_models
from engine.config.toml_config import ConfigError, check, read_toml, section
from engine.config.upscaler_settings import UpscalerSettings, parse_upscalers
from engine.params import (
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_HIRES_UPSCALER,
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_WIDTH,
    SAMPLER_NAMES,
    SCHEDULE_NAMES,
    SEED_MAX,
    GenerationParams,
    parse_size,
)

#: Where the bot runs its engine (``engine.process``).
ENGINE_PROCESSES = ("worker", "bot")


#: ``engine.compile``: off, or one of torch.compile's modes.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class EngineSettings:
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 8
    preview_every: int = 2
    job_timeout: float = 600.0  # seconds a job may run in the worker; 0: no limit
    max_loaded_models: int = 1  # models kept on the device at once; the least recently used leaves
    model_switch_after: float = 120.0  # seconds a job for another model waits before it gets its turn
    # Seconds a job that cannot join the running batch (another size, model or LoRA set) lets jobs
    # behind it join instead; past that nothing more joins, the batch drains and it goes next.
    overtake_window: float = 10.0
    # "off", or a torch.compile mode for the UNet ("default", "reduce-overhead": CUDA graphs,
    # "max-autotune"...): one graph per image size, row bucket (1, 2, 4, 8, 12, 16, 24, 32) and prompt length.
    compile: str = "off"
    compile_graphs: int = 24  # at most this many UNet graphs, and sampler graphs; past it eager (logged, counted)
    compile_capture: str = "lazy"  # "lazy": each graph on first use; "start": every size x bucket at start
    # zlib level of the result PNGs, 0 (none) to 9 (smallest); encoded off the engine thread, but
    # each level up costs CPU per image for a smaller file. The pixels are the same at every level.
    png_compress_level: int = 1
    # Images the VAE decodes at once when jobs finish: more is faster on a big GPU, less peak memory.
    decode_chunk: int = 4
    # Where ``python -m bot`` runs the engine: "worker", its child process ``python -m engine
    # worker`` (faster: BENCHMARKS.md, issue 11 §7), or "bot", a thread of the bot's own process.
    process: str = "worker"
    # Where SD 3.5's and Flux's text encoders run: "device" (with the model) or "cpu" (they run
    # once per prompt; T5-XXL alone is 9.5 GB in bf16).
    text_encoders: str = "device"
    # LoRAs of different jobs share a batch (engine.features.lora_slots): the denoising network
    # holds up to lora_slots LoRAs at once, each padded to lora_max_rank (memory per LoRA layer:
    # slots x rank x (in + out) values); a LoRA over the rank runs in a batch of its own. 0: none.
    lora_slots: int = 4
    lora_max_rank: int = 64


@dataclass(frozen=True)
class GenerationSettings:
    default_steps: int = DEFAULT_STEPS
    max_steps: int = 50
    default_width: int = DEFAULT_WIDTH
    default_height: int = DEFAULT_HEIGHT
    max_width: int = 1024
    max_height: int = 1024
    sizes: tuple[str, ...] = ("512x512", "512x768", "768x512", "768x768")
    # Offered instead of ``sizes`` when the default model is SDXL; the first is then the default
    # size, and max_width/max_height are raised to fit them (see :meth:`for_family`).
    sdxl_sizes: tuple[str, ...] = ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216")
    default_guidance: float = DEFAULT_GUIDANCE
    max_guidance: float = 20.0
    default_sampler: str = DEFAULT_SAMPLER
    samplers: tuple[str, ...] = tuple(SAMPLER_NAMES)
    default_schedule: str = DEFAULT_SCHEDULE
    schedules: tuple[str, ...] = tuple(SCHEDULE_NAMES)
    default_negative_prompt: str = ""
    max_count: int = 4
    default_strength: float = DEFAULT_STRENGTH
    # Set by :meth:`for_family` for a model's family, not read from the file.
    family: str = field(default="", metadata={"derived": True})  # "": the SD families, as configured
    pixel_multiple: int = field(default=8, metadata={"derived": True})  # sizes are multiples of this

    @property
    def size_pairs(self) -> tuple[tuple[int, int], ...]:
        """``sizes`` as ``(width, height)`` (checked when the file was read)."""
        return tuple(parse_size(size) for size in self.sizes)  # type: ignore[misc]

    def params(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: tuple[int, int] | None = None,
        sampler: str | None = None,
        count: int | None = None,
        init_image: bytes | None = None,
        strength: float | None = None,
        model: str | None = None,
        clip_skip: int | None = None,
        schedule: str | None = None,
        hires_scale: float | None = None,
        hires_steps: int | None = None,
        hires_upscaler: str | None = None,
        hires_strength: float | None = None,
    ) -> GenerationParams:
        """A job's parameters, with this configuration's defaults for what was left out (None).

        The one place where configured defaults are filled in: the bot's admission applies the
        member's defaults and the server's limits first, ``python -m engine generate`` its flags.
        """
        width, height = size or (self.default_width, self.default_height)
        return GenerationParams(
            prompt=prompt,
            seed=secrets.randbelow(SEED_MAX + 1) if seed is None else seed,
            negative_prompt=self.default_negative_prompt if negative_prompt is None else negative_prompt,
            steps=steps or self.default_steps,
            guidance=self.default_guidance if guidance is None else guidance,
            width=width,
            height=height,
            sampler=sampler or self.default_sampler,
            count=count or 1,
            init_image=init_image,
            strength=self.default_strength if strength is None else strength,
            model=model,
            clip_skip=clip_skip or 1,
            schedule=schedule or self.default_schedule,
            hires_scale=hires_scale if hires_scale and hires_scale > 1 else None,
            hires_steps=hires_steps or 0,
            hires_upscaler=hires_upscaler or DEFAULT_HIRES_UPSCALER,
            hires_strength=DEFAULT_HIRES_STRENGTH if hires_strength is None else hires_strength,
        )

    def for_family(self, family: str, guidance: str = "cfg", model: ModelSettings | None = None) -> GenerationSettings:
        """These settings for a model of ``family`` (``guidance``: how it is guided; ``model``: its
        own table's defaults come first): see :mod:`engine.families.generation`. For ``"sdxl"``,
        ``sdxl_sizes`` are the size choices, its first entry the default size, and the maxima are
        raised (never lowered) to fit the widest and tallest of them; SD 3.5 and Flux as well, in
        multiples of 16, with their own steps, guidance, samplers and schedules."""
        from engine.families.generation import for_family

        return for_family(self, family, guidance, model)


@dataclass(frozen=True)
class Settings:
    """The sections the engine needs, as one value."""

    model: ModelSettings  # the default model: ``[model]``, else the first ``[models.<name>]``
    engine: EngineSettings
    generation: GenerationSettings
    models: tuple[ModelSettings, ...] = ()  # the other models, besides the default
    upscalers: UpscalerSettings = UpscalerSettings()  # ``[upscalers]``: the U buttons' models
    describe: DescribeSettings = DescribeSettings()  # ``[describe]``: /describe's captioner

    @property
    def all_models(self) -> tuple[ModelSettings, ...]:
        """Every configured model, the default first; names are unique."""
        default = self.model.display_name
        return (self.model, *(m for m in self.models if m.display_name != default))


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: ``engine.text_encoders`` (engine/families/flow_storage.py).
TEXT_ENCODER_PLACES = ("device", "cpu")


def parse_engine_sections(raw: dict[str, Any]) -> Settings:
    model, models = parse_models(raw)
    engine: EngineSettings = section(raw, "engine", EngineSettings)
    gen: GenerationSettings = section(raw, "generation", GenerationSettings)

    check(
        engine.device in DEVICES or engine.device.startswith("cuda:"),
        "engine.device",
        engine.device,
        "auto, cpu, cuda, cuda:N or mps",
    )
    check(engine.dtype in DTYPES, "engine.dtype", engine.dtype, f"one of {', '.join(DTYPES)}")
    check(1 <= engine.max_batch <= 256, "engine.max_batch", engine.max_batch, "1 to 256")
    check(0 <= engine.lora_slots <= 64, "engine.lora_slots", engine.lora_slots, "0 (every LoRA set alone) to 64")
    check(1 <= engine.lora_max_rank <= 1024, "engine.lora_max_rank", engine.lora_max_rank, "1 to 1024")
    check(engine.preview_every >= 0, "engine.preview_every", engine.preview_every, "0 (never) or more")
    check(engine.job_timeout >= 0, "engine.job_timeout", engine.job_timeout, "seconds, 0 (no limit) or more")
    check(1 <= engine.max_loaded_models <= 16, "engine.max_loaded_models", engine.max_loaded_models, "1 to 16")
    check(engine.model_switch_after >= 0, "engine.model_switch_after", engine.model_switch_after, "seconds, 0 or more")
    check(
        engine.overtake_window >= 0,
        "engine.overtake_window",
        engine.overtake_window,
        "seconds, 0 (strict arrival order) or more",
    )
    check(engine.compile in COMPILE_MODES, "engine.compile", engine.compile, f"one of {', '.join(COMPILE_MODES)}")
    check(
        0 <= engine.png_compress_level <= 9,
        "engine.png_compress_level",
        engine.png_compress_level,
        "0 (fastest, largest files) to 9 (smallest, slowest)",
    )

    check(1 <= engine.compile_graphs <= 256, "engine.compile_graphs", engine.compile_graphs, "1 to 256 graphs")
    check(
        engine.compile_capture in ("lazy", "start"), "engine.compile_capture", engine.compile_capture, "lazy or start"
    )
    check(1 <= engine.decode_chunk <= 64, "engine.decode_chunk", engine.decode_chunk, "1 to 64 images")
    check(
        engine.text_encoders in TEXT_ENCODER_PLACES,
        "engine.text_encoders",
        engine.text_encoders,
        '"device" (with the model) or "cpu" (SD 3.5 and Flux.1 text encoders on the CPU)',
    )
    check(
        engine.process in ENGINE_PROCESSES,
        "engine.process",
        engine.process,
        '"worker" (the bot starts python -m engine worker as its child) or "bot" (in the bot\'s own process)',
    )

    check(1 <= gen.max_steps <= 500, "generation.max_steps", gen.max_steps, "1 to 500")
    check(
        1 <= gen.default_steps <= gen.max_steps,
        "generation.default_steps",
        gen.default_steps,
        f"1 to generation.max_steps ({gen.max_steps})",
    )
    for key in ("max_width", "max_height"):
        v = getattr(gen, key)
        check(64 <= v <= 4096 and v % 8 == 0, f"generation.{key}", v, "a multiple of 8 from 64 to 4096")
    for key, limit in (("default_width", gen.max_width), ("default_height", gen.max_height)):
        v = getattr(gen, key)
        check(8 <= v <= limit and v % 8 == 0, f"generation.{key}", v, f"a multiple of 8 up to {limit}")
    check(len(gen.sizes) > 0, "generation.sizes", list(gen.sizes), 'at least one size such as "512x512"')
    for size in gen.sizes:
        w, h = parse_size(size)
        check(
            w is not None and w <= gen.max_width and h <= gen.max_height,
            "generation.sizes",
            size,
            f"WIDTHxHEIGHT, multiples of 8, within {gen.max_width}x{gen.max_height}",
        )
    check(
        0 < len(gen.sdxl_sizes) <= 25,
        "generation.sdxl_sizes",
        list(gen.sdxl_sizes),
        '1 to 25 sizes such as "1024x1024" (the first is the SDXL default size)',
    )
    for size in gen.sdxl_sizes:
        w, h = parse_size(size) if isinstance(size, str) else (None, None)
        check(
            w is not None and w <= 4096 and h <= 4096,
            "generation.sdxl_sizes",
            size,
            "WIDTHxHEIGHT, multiples of 8, at most 4096x4096 (max_width/max_height are raised to fit)",
        )
    check(0 < gen.max_guidance <= 50, "generation.max_guidance", gen.max_guidance, "above 0, at most 50")
    check(
        0 <= gen.default_guidance <= gen.max_guidance,
        "generation.default_guidance",
        gen.default_guidance,
        f"0 to generation.max_guidance ({gen.max_guidance})",
    )
    for name in gen.samplers:
        check(name in SAMPLER_NAMES, "generation.samplers", name, f"samplers are {', '.join(SAMPLER_NAMES)}")
    check(len(gen.samplers) > 0, "generation.samplers", [], "at least one sampler")
    check(
        gen.default_sampler in gen.samplers,
        "generation.default_sampler",
        gen.default_sampler,
        f"one of generation.samplers ({', '.join(gen.samplers)})",
    )
    for name in gen.schedules:
        check(name in SCHEDULE_NAMES, "generation.schedules", name, f"schedule types are {', '.join(SCHEDULE_NAMES)}")
    check(len(gen.schedules) > 0, "generation.schedules", [], 'at least one schedule type, such as "automatic"')
    check(
        gen.default_schedule in gen.schedules,
        "generation.default_schedule",
        gen.default_schedule,
        f"one of generation.schedules ({', '.join(gen.schedules)})",
    )
    check(1 <= gen.max_count <= 4, "generation.max_count", gen.max_count, "1 to 4")
    check(0 < gen.default_strength <= 1, "generation.default_strength", gen.default_strength, "above 0, at most 1")
    return Settings(
        model=model, engine=engine, generation=gen, models=models, upscalers=parse_upscalers(raw),
        describe=parse_describe(raw),
    )  # fmt: skip


def parse_queue_section(raw: dict[str, Any]) -> QueueSettings:
    """``[queue]``: read here so that a GPU worker process without the bot can use it too."""
    queue: QueueSettings = section(raw, "queue", QueueSettings)
    check(
        queue.database_url.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql"),
        "queue.database_url",
        queue.database_url,
        "an SQLAlchemy URL: sqlite:///path/to/file.sqlite3 or postgresql+psycopg://user@host/db",
    )
    check(1 <= queue.pending_limit <= 100, "queue.pending_limit", queue.pending_limit, "1 to 100")
    check(1 <= queue.max_attempts <= 20, "queue.max_attempts", queue.max_attempts, "1 to 20")
    check(5 <= queue.lease_seconds <= 3600, "queue.lease_seconds", queue.lease_seconds, "5 to 3600 seconds")
    return queue


def load_settings(path: str | Path = "config.toml") -> Settings:
    """Read the engine's sections of config.toml (used by ``python -m engine``)."""
    return parse_engine_sections(read_toml(path))


def resolve_device(settings: EngineSettings):
    """``auto``: CUDA with bf16 (fp16 where bf16 is unsupported) when present, else CPU fp32."""
    import torch

    if settings.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f'engine.device = {settings.device!r}: no CUDA GPU is visible; use "auto" or "cpu"')
    if settings.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            dtype = torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype
