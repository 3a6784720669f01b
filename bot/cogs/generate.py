"""/imagine and /img2img: check the options, admit the job, queue it.

Option types carry this configuration's limits, which discord.py reads from the annotations
when a command is defined: hence the cog class is made by :func:`generate_cog` from the
:class:`~bot.transformers.Options`. (No ``from __future__ import annotations`` here: discord.py
needs the annotations as objects.)
"""

import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot.inputs import check_attachment_meta
from bot.policy import Asked
from bot.service import JobService
from bot.transformers import Options
from db.models import JobKind
from engine.params import DEFAULT_HIRES_STRENGTH, DEFAULT_HIRES_UPSCALER, SAMPLER_NAMES


def generate_cog(service: JobService, o: Options) -> commands.Cog:
    config = service.config
    gen = config.generation
    described = dict(
        prompt="What to draw (--ar, {a, b}: see /help)",
        negative="What to keep out of the image",
        seed="Seed for the noise; random when left out",
        steps=f"Denoising steps (default {gen.default_steps})",
        guidance=f"How closely to follow the prompt (default {gen.default_guidance:g})",
        size=f"Width x height (default {gen.default_width}x{gen.default_height})",
        sampler=f"Sampler (default {SAMPLER_NAMES[gen.default_sampler]})",
        count="Images to make (default 1)",
        model=f"Model (default {config.model.display_name}); LoRA: <lora:name:0.8> in the prompt",
        style="One of this server's styles (prompt templates); default: yours, set with /settings",
        clip_skip="CLIP skip (default: the model's; anime models often want 2)",
        schedule=f"Schedule type, as in AUTOMATIC1111 (default {gen.default_schedule})",
    )
    hires_described = dict(
        hires="Hires fix: make it at its size, enlarge it by this and redraw the detail",
        hires_steps="Steps of the hires pass (default: the same as steps)",
        hires_upscaler=f"How the hires fix enlarges (default {DEFAULT_HIRES_UPSCALER}, in latent space)",
        hires_strength=f"How much the hires pass redraws (default {DEFAULT_HIRES_STRENGTH:g})",
    )
    reference_described = dict(
        reference="An image that guides the new one",
        reference_mode="What of it guides (default edges)",
        reference_strength="How strongly (default 1)",
    )

    class Generate(commands.Cog, name="generate"):
        """Making images from a prompt, or from an uploaded image and a prompt."""

        def __init__(self, service: JobService) -> None:
            self.service = service

        @app_commands.command(name="imagine", description="Make images from a text prompt")
        @app_commands.describe(**described, **hires_described, **reference_described)
        async def imagine(
            self,
            interaction: discord.Interaction,
            prompt: Transform[str, o.prompt],
            negative: Transform[str, o.negative] = None,
            seed: Transform[int, o.seed] = None,
            steps: Transform[int, o.steps] = None,
            guidance: Transform[float, o.guidance] = None,
            size: Transform[str, o.size] = None,
            sampler: Transform[str, o.sampler] = None,
            count: Transform[int, o.count] = None,
            model: Transform[str, o.model] = None,
            style: Transform[str, o.style] = None,
            clip_skip: Transform[int, o.clip_skip] = None,
            schedule: Transform[str, o.schedule] = None,
            hires: Transform[float, o.hires] = None,
            hires_steps: Transform[int, o.hires_steps] = None,
            hires_upscaler: Transform[str, o.hires_upscaler] = None,
            hires_strength: Transform[float, o.hires_strength] = None,
            reference: discord.Attachment | None = None,
            reference_mode: Transform[str, o.reference_mode] = None,
            reference_strength: Transform[float, o.reference_strength] = None,
        ) -> None:
            asked = Asked(
                prompt,
                negative=negative,
                seed=seed,
                steps=steps,
                guidance=guidance,
                size=size,
                sampler=sampler,
                count=count,
                model=model,
                style=style,
                clip_skip=clip_skip,
                schedule=schedule,
                hires=hires,
                hires_steps=hires_steps,
                hires_upscaler=hires_upscaler,
                hires_strength=hires_strength,
                reference_mode=reference_mode,
                reference_strength=reference_strength,
            )
            submitted = self.service.submit_command(interaction, JobKind.txt2img, asked, reference=reference)
            await self.service.guarded(interaction, submitted)

        @app_commands.command(name="img2img", description="Make images from an uploaded image and a prompt")
        @app_commands.describe(
            image="A PNG, JPEG or WebP image",
            strength=f"How much to change the image (default {gen.default_strength:g})",
            **described,
        )
        async def img2img(
            self,
            interaction: discord.Interaction,
            image: discord.Attachment,
            prompt: Transform[str, o.prompt],
            strength: Transform[float, o.strength] = None,
            negative: Transform[str, o.negative] = None,
            seed: Transform[int, o.seed] = None,
            steps: Transform[int, o.steps] = None,
            guidance: Transform[float, o.guidance] = None,
            size: Transform[str, o.size] = None,
            sampler: Transform[str, o.sampler] = None,
            count: Transform[int, o.count] = None,
            model: Transform[str, o.model] = None,
            style: Transform[str, o.style] = None,
            clip_skip: Transform[int, o.clip_skip] = None,
            schedule: Transform[str, o.schedule] = None,
        ) -> None:
            asked = Asked(
                prompt,
                negative=negative,
                seed=seed,
                steps=steps,
                guidance=guidance,
                size=size,
                sampler=sampler,
                count=count,
                model=model,
                strength=strength,
                style=style,
                clip_skip=clip_skip,
                schedule=schedule,
            )
            await self.service.guarded(interaction, self._img2img(interaction, image, asked))

        @app_commands.command(name="inpaint", description="Change part of an uploaded image: white in the mask changes")
        @app_commands.describe(
            image="A PNG, JPEG or WebP image",
            mask="A PNG: white (or transparent) where the image should change, black where not",
            strength=f"How much the masked part changes (default {gen.default_strength:g})",
            **{k: v for k, v in described.items() if k != "size"},
        )
        async def inpaint(
            self,
            interaction: discord.Interaction,
            image: discord.Attachment,
            mask: discord.Attachment,
            prompt: Transform[str, o.prompt],
            strength: Transform[float, o.strength] = None,
            negative: Transform[str, o.negative] = None,
            seed: Transform[int, o.seed] = None,
            steps: Transform[int, o.steps] = None,
            guidance: Transform[float, o.guidance] = None,
            sampler: Transform[str, o.sampler] = None,
            count: Transform[int, o.count] = None,
            model: Transform[str, o.model] = None,
            style: Transform[str, o.style] = None,
            clip_skip: Transform[int, o.clip_skip] = None,
            schedule: Transform[str, o.schedule] = None,
        ) -> None:
            asked = Asked(
                prompt,
                negative=negative,
                seed=seed,
                steps=steps,
                guidance=guidance,
                sampler=sampler,
                count=count,
                model=model,
                strength=strength,
                style=style,
                clip_skip=clip_skip,
                schedule=schedule,
            )
            await self.service.guarded(interaction, self._img2img(interaction, image, asked, mask))

        async def _img2img(
            self,
            interaction: discord.Interaction,
            image: discord.Attachment,
            asked: Asked,
            mask: discord.Attachment | None = None,
        ) -> None:
            """The uploads' names, types, sizes and hosts are checked before they are downloaded."""
            dc = config.discord
            for upload, types in ((image, dc.allowed_image_types), (mask, ("image/png", "image/webp"))):
                if upload is not None:
                    check_attachment_meta(
                        filename=upload.filename,
                        content_type=upload.content_type,
                        size=upload.size,
                        url=upload.url,
                        allowed_types=types,
                        max_bytes=dc.max_attachment_bytes,
                        allowed_hosts=self.service.allowed_hosts,
                    )
            kind = JobKind.img2img if mask is None else JobKind.inpaint
            await self.service.submit_command(interaction, kind, asked, image, mask)

    return Generate(service)
