"""txt2img, img2img and inpainting: from a request to latents ready to denoise, and from latents to PNGs.

A job is prepared (:meth:`Pipeline.txt2img` / :meth:`Pipeline.img2img`), denoised in a
:class:`~engine.batching.batch.Batch` (alone, or among other members' jobs in the worker), then finished
(:meth:`Pipeline.decode`, with a float32 retry for a low-precision VAE's NaN or black images, and
:meth:`Pipeline.finish` for PNG metadata). :meth:`Pipeline.generate` runs all three for one job
without a thread, which is what tests and the one-at-a-time benchmark use. A masked img2img job
(``GenerationParams.mask``) is laid out in pixels by :mod:`engine.features.masks` and in latents by
:mod:`engine.features.inpaint`; its decoded images are pasted back over the init image in :meth:`finish`.

Randomness comes only from the request's seeds: image ``i`` of a job has its own CPU
``torch.Generator`` seeded with ``seed + i``, which draws the initial noise and then any
ancestral noise (for the whole run when the job is prepared: :attr:`PreparedJob.noise`), so an
image never depends on the device's RNG or on what shared its batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from engine.batching.batch import Batch, to_device
from engine.errors import GenerationError
from engine.families.runtime import family_parts
from engine.families.sd.denoiser import Conditioning
from engine.features.controlnet import job_control
from engine.features.controlnet_loading import ControlNets
from engine.features.inpaint import Inpainter, LatentBlend
from engine.features.instruct_edit import INSTRUCT_CHANNELS, edit_job
from engine.features.ip_adapter import is_ip_unit
from engine.features.ip_loading import IPAdapters
from engine.features.lora import LoraLibrary
from engine.features.masks import InpaintPlan, open_image, plan_inpaint
from engine.features.tiling import set_tiling
from engine.metadata import PNG_COMPRESS_LEVEL, encode_png, infotext
from engine.params import MASKED_CONTENT, MAX_INPAINT_PADDING, MAX_MASK_BLUR
from engine.prompt_syntax import lora_key
from engine.sampling.samplers import SAMPLERS, Sampler
from engine.sampling.schedules import SCHEDULES, JobSchedule
from engine.sampling.sde import BrownianNoise, brownian_noises
from engine.sampling.seeds import initial_noise
from engine.sampling.stages import Plan
from engine.types import GeneratedImage, GenerationRequest, GenerationResult
from engine.vae import VaeDecoder

if TYPE_CHECKING:
    from engine.families.loading import LoadedModel

log = logging.getLogger(__name__)

#: VAE decodes at most this many images at once (its activations at full size are large).
DECODE_CHUNK = 4


@dataclass
class PreparedJob:
    """A job ready to join a batch: its start latents, conditioning, schedule and generators."""

    request: GenerationRequest
    sampler: Sampler
    sigmas: Tensor  # [total_steps + 1] float32 on the CPU, start noise level down to 0 (DDIM: to timestep 1)
    seeds: list[int]
    generators: list[torch.Generator]  # one per image, for ancestral noise after the initial noise
    latents: Tensor  # [count, C, h, w] float32 on the device, at noise level sigmas[0]
    cond: Conditioning
    started: float = field(default_factory=time.monotonic)
    blend: LatentBlend | None = None  # a masked job on a 4-channel UNet: what stays outside the mask
    inpaint_plan: InpaintPlan | None = None  # a masked job: how its images are pasted back over the init image
    plan: Plan | None = None  # the sampler's engine steps over ``sigmas`` (made from them when None)
    brownian: list[BrownianNoise] = field(default_factory=list)  # per image, for the SDE samplers
    origin: GenerationRequest | None = None  # a hires job's second pass: the job as asked, for its PNG
    #: [engine steps, rows, C, h, w] on the device: each step's fresh noise, drawn in step order (the
    #: values of drawing step by step) and uploaded once, so a step does neither; None: draws none.
    noise: Tensor | None = None

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = self.sampler.plan(self.sigmas)
        if self.sampler.brownian and not self.brownian:
            self.brownian = brownian_noises(self.seeds, tuple(self.latents.shape[1:]), self.sigmas)
        if self.noise is None and (self.sampler.ancestral or self.sampler.brownian):
            drawn = torch.stack([self.step_noise(k) for k in range(self.engine_steps)])
            self.noise = to_device(drawn, self.latents.device)

    @property
    def rows(self) -> int:
        return len(self.seeds)

    @property
    def total_steps(self) -> int:
        """The member's steps (progress counts these)."""
        return len(self.sigmas) - 1

    @property
    def engine_steps(self) -> int:
        """UNet calls: the steps, or twice the steps less one for a second-order sampler."""
        return self.plan.engine_steps

    def step_noise(self, engine_step: int) -> Tensor:
        """Fresh noise per image for one engine step, as its plan says (zeros where it draws none)."""
        interval = self.plan.noise[engine_step]
        if interval is None:
            return torch.zeros(self.rows, *self.latents.shape[1:])
        if self.sampler.brownian:
            return torch.stack([noise(*interval) for noise in self.brownian])
        return self.ancestral_noise()

    def ancestral_noise(self) -> Tensor:
        """One fresh standard-normal latent per image, each from that image's generator."""
        shape = self.latents.shape[1:]
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])


def fit_image(data: bytes, width: int, height: int) -> Image.Image:
    """Decode an uploaded image, upright and RGB, resized and center-cropped to width x height."""
    image = open_image(data).convert("RGB")
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


class Pipeline:
    """One loaded model, ready to prepare, denoise and finish jobs."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        # 1. The family's pieces (engine.families): noise model, denoiser, prompts, channels.
        parts = family_parts(model)
        self.parts, self.traits, self.noise = parts, parts.traits, parts.noise
        self.denoiser, self.prompts, self.latent_channels = parts.denoiser, parts.prompts, parts.latent_channels
        self.loras = LoraLibrary.of(model)
        self.latent_scale = model.info.latent_scale
        # The VAE stays in the model's precision: an image it gets wrong (the SD/SDXL VAEs can
        # overflow in float16) is decoded again by a float32 copy, not every image in float32.
        self.vae_dtype = model.dtype
        if model.vae.dtype != self.vae_dtype:
            model.vae.to(self.vae_dtype)
        self.vae = VaeDecoder(model.vae, model.vae_scaling_factor)
        #: The ControlNets of the model's ``controlnet_dir``, loaded by name when a job names one.
        self.controlnets = ControlNets(model.controlnet_dir or "", model.device, model.dtype)
        #: Its IP-Adapter and image encoder, loaded on the first job with an IP-Adapter reference.
        self.ip_adapters = IPAdapters(model.ip_adapter, model.image_encoder, model.unet)
        self.tiling = False  # seamless tiling (engine.features.tiling): the convolutions' padding is circular
        if self.device.type == "cuda":
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        self.inpainter = Inpainter(
            self.encode_image, parts.network_channels, self.latent_scale, self.device, self.dtype, flow=self.traits.flow
        )

    @property
    def family(self) -> str:
        return self.model.info.family

    def latent_size(self, request: GenerationRequest) -> tuple[int, int]:
        return request.params.height // self.latent_scale, request.params.width // self.latent_scale

    # ------------------------------------------------------------------ preparing a job

    def prepare(self, request: GenerationRequest, init: Image.Image | None = None) -> PreparedJob:
        """Prepare a job, with its prompt's LoRA set applied to the text encoders and its rows'
        LoRA slots in its conditioning (``init``: its init image at its size already, e.g.
        enlarged by its upscaler). A set that runs whole (engine.features.lora) stays applied to
        the network until the next job's prepare: the worker's batch key gives it a batch of its own.
        """
        if self.parts.network_channels == INSTRUCT_CHANNELS:  # an InstructPix2Pix model: edits only
            return edit_job(self, request, init, fit_image)
        self.use_loras(request)
        job = self.img2img(request, init) if request.is_img2img else self.txt2img(request)
        if request.params.control_units:
            job.cond = self._controlled(job)
        return job

    def _controlled(self, job: PreparedJob, units: tuple | None = None) -> Conditioning:
        """The job's ControlNet units (or ``units``) on its rows, at its size and over its steps
        (engine.features.controlnet); its IP-Adapter reference's tokens (engine.features.ip_adapter)."""
        params = job.request.params
        units = params.control_units if units is None else units
        ip = self.ip_adapters.job_rows(units, job.rows)
        units = tuple(unit for unit in units if not is_ip_unit(unit))
        if not units:
            return dataclasses.replace(job.cond, ip=ip)
        control, _maps = job_control(
            units,
            self.controlnets,
            rows=job.rows,
            tokens=job.cond.embeds.shape[1],
            width=params.width,
            height=params.height,
            sigmas=job.sigmas,
            cross_attention_dim=self.model.unet.config.cross_attention_dim,
        )
        return dataclasses.replace(job.cond, control=control, ip=ip)

    def use_loras(self, request: GenerationRequest) -> None:
        self.loras.activate(lora_key(request.params.prompt))
        self.prompts.variant = self.loras.active  # encodings made under another set are not reused
        if request.params.tiling != self.tiling:  # per module, as the LoRA set: one per batch
            self.tiling = request.params.tiling
            set_tiling((self.model.unet, self.model.vae, self.vae._fp32), self.tiling)

    def txt2img(self, request: GenerationRequest) -> PreparedJob:
        """A job that starts from pure noise."""
        # 1. Check what the Discord boundary cannot know: the model's latent grid.
        sampler = self._check(request)
        # 2. Encode prompt and negative prompt (cached per prompt).
        cond = self._unmasked_conditioning(request)
        # 3. The sampler's sigmas for the job's schedule type, from the highest noise level down.
        plan = self._schedule(request, sampler)
        # 4. Initial noise per image seed (mixed with the variation seed's), scaled for sigmas[0].
        seeds, generators, noise = self._initial_noise(request)
        latents = plan.start_latents(noise.to(self.device))
        return PreparedJob(request, sampler, plan.sigmas.float(), seeds, generators, latents, cond)

    def img2img(self, request: GenerationRequest, init: Image.Image | None = None) -> PreparedJob:
        """A job that starts from the member's image (or ``init``), noised according to ``strength``."""
        # 1. Check inputs, and decode the init image (and mask) now so a bad upload fails before any work.
        sampler = self._check(request)
        if request.params.is_masked:
            return self.inpaint(request, sampler)
        if init is None:
            init = fit_image(request.params.init_image, request.params.width, request.params.height)
        # 2. Encode prompt and negative prompt (cached per prompt).
        cond = self._unmasked_conditioning(request)
        # 3. The tail of the sampler's sigmas: strength 1 starts at full noise, 0.3 near the end.
        plan = self._schedule(request, sampler, request.params.strength)
        # 4. The image into latent space (VAE mean: deterministic), repeated per image.
        init_latents = self.encode_image(init).expand(len(cond.guidance), -1, -1, -1)
        # 5. Noise per image seed added at the start noise level.
        seeds, generators, noise = self._initial_noise(request)
        latents = plan.start_latents(noise.to(self.device), init=init_latents)
        return PreparedJob(request, sampler, plan.sigmas.float(), seeds, generators, latents, cond)

    def inpaint(self, request: GenerationRequest, sampler: Sampler) -> PreparedJob:
        """An img2img job that repaints only its mask's area (see :mod:`engine.features.masks`)."""
        # 1. Lay the job out in pixels: feathered mask, "only masked" crop, masked content "fill".
        layout = plan_inpaint(request.params)
        # 2. Encode prompt and negative prompt (cached per prompt).
        cond = self._conditioning(request)
        # 3. The tail of the sampler's sigmas, as for any img2img job.
        schedule = self._schedule(request, sampler, request.params.strength)
        sigmas = schedule.sigmas.float()
        # 4. Noise per image seed; it also noises the kept area at every step.
        seeds, generators, noise = self._initial_noise(request)
        noise = noise.to(self.device)
        # 5. Init latents with the masked content, and the mask as a blend or as UNet input channels.
        start = self.inpainter.start(layout, request.params.masked_content, noise)
        if start.image_conditioning is not None:
            cond = dataclasses.replace(cond, image=start.image_conditioning)
        latents = schedule.start_latents(noise, init=start.init_latents)
        return PreparedJob(
            request, sampler, sigmas, seeds, generators, latents, cond, blend=start.blend, inpaint_plan=layout
        )

    def _check(self, request: GenerationRequest) -> Sampler:
        if request.params.sampler not in SAMPLERS:
            raise GenerationError(f"Unknown sampler {request.params.sampler!r}; use one of {', '.join(SAMPLERS)}.")
        if refusal := self.parts.refusal(request.params):
            raise GenerationError(refusal)
        multiple = max(self.latent_scale, self.traits.pixel_multiple)
        if request.params.width % multiple or request.params.height % multiple:
            raise GenerationError(
                f"Size {request.params.width}x{request.params.height} is not a multiple of {multiple}; "
                "pick a listed size."
            )
        if request.params.is_masked and not request.params.is_img2img:
            raise GenerationError("A mask needs the image it applies to: attach an init image as well.")
        if not (
            0 <= request.params.mask_blur <= MAX_MASK_BLUR
            and 0 <= request.params.inpaint_padding <= MAX_INPAINT_PADDING
        ):
            raise GenerationError(
                f"Mask blur must be 0 to {MAX_MASK_BLUR} pixels and the masked area padding 0 to {MAX_INPAINT_PADDING}."
            )
        if request.params.masked_content not in MASKED_CONTENT:
            raise GenerationError(
                f"Unknown masked content {request.params.masked_content!r}; use one of {', '.join(MASKED_CONTENT)}."
            )
        if request.params.schedule != "automatic" and request.params.schedule not in SCHEDULES:
            raise GenerationError(
                f"Unknown schedule type {request.params.schedule!r}; use automatic or one of {', '.join(SCHEDULES)}."
            )
        return SAMPLERS[request.params.sampler]

    def _schedule(self, request: GenerationRequest, sampler: Sampler, strength: float | None = None) -> JobSchedule:
        """The job's schedule for its sampler and schedule type, from the family's noise model
        (DDIM: A1111's own timesteps; a flow model: its own sigmas for the image's size)."""
        params = request.params
        return self.noise.job_schedule(
            sampler, params.steps, strength, schedule_type=params.schedule, width=params.width, height=params.height
        )

    def _unmasked_conditioning(self, request: GenerationRequest) -> Conditioning:
        """The prompts' conditioning, plus "paint everywhere" for an inpainting UNet."""
        cond = self._conditioning(request)
        image = self.inpainter.unmasked_conditioning(request.params.count, request.params.width, request.params.height)
        return cond if image is None else dataclasses.replace(cond, image=image)

    def _conditioning(self, request: GenerationRequest) -> Conditioning:
        """The job's rows' conditioning; a Dynamic Prompts template draws each image's prompt
        with its seed (engine.prompt_templates), equal prompts encoded once."""
        params = request.params
        prompts = [params.image_prompt(params.seed + i) for i in range(params.count)]
        runs = [(prompt, len(list(group))) for prompt, group in itertools.groupby(prompts)]
        parts = [
            self.prompts.conditioning(
                prompt,
                params.negative_prompt,
                rows=rows,
                guidance=params.guidance,
                width=params.width,
                height=params.height,
                clip_skip=params.clip_skip,
            )
            for prompt, rows in runs
        ]
        cond = parts[0] if len(parts) == 1 else type(parts[0]).cat(parts)  # the family's own rows
        return self.loras.per_row(cond)  # its LoRAs' slots and weights on every row

    def _initial_noise(self, request: GenerationRequest) -> tuple[list[int], list[torch.Generator], Tensor]:
        """Per image: a generator seeded ``seed + i``, its first draw as noise (engine.sampling.seeds)."""
        return initial_noise(request.params, (self.latent_channels, *self.latent_size(request)))

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> Tensor:
        """RGB image -> [1, C, h, w] scaled latents (float32, on the device)."""
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
        pixels = (pixels.float() / 127.5 - 1).to(self.device)
        vae_config = self.model.vae.config
        latents = self.model.vae.encode(pixels.to(self.vae_dtype)).latent_dist.mean.float()
        if not bool(torch.isfinite(latents).all()):  # overflowed in low precision: once more in float32
            latents = self.float32_vae().encode(pixels).latent_dist.mean.float()
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * self.model.vae_scaling_factor

    # ------------------------------------------------------------------ finishing a job

    @torch.inference_mode()
    def decode(self, latents: Tensor, chunk_size: int = DECODE_CHUNK) -> list[Image.Image | None]:
        """Scaled latents [n, C, h, w] -> n RGB images (None: invalid even in float32), in chunks."""
        return to_images(*self.decode_pixels(latents, chunk_size))

    @torch.inference_mode()
    def decode_pixels(self, latents: Tensor, chunk_size: int = DECODE_CHUNK) -> tuple[Tensor, Tensor]:
        """Scaled latents [n, C, h, w] -> float32 pixels [n, 3, H, W] in [-1, 1] on the device, and
        [n] bool, True for an image that is invalid; decoded in chunks.

        A float16/bfloat16 VAE's NaN/inf or black images are decoded again in float32
        (:mod:`engine.vae`); an image still NaN/inf after that is invalid. Turning pixels into
        images is :func:`to_images`' work (off the engine thread, in the worker).
        """
        return self.vae(latents, chunk_size)

    def float32_vae(self):
        """The VAE in float32 (the model's own, or a copy made once)."""
        return self.vae.float32_vae()

    def finish(
        self, job: PreparedJob, images: list[Image.Image], compress_level: int = PNG_COMPRESS_LEVEL
    ) -> GenerationResult:
        """PNG bytes with AUTOMATIC1111 parameters for each decoded image (any thread)."""
        request, info = job.origin or job.request, self.model.info
        if job.inpaint_plan is not None:
            images = [job.inpaint_plan.paste(image) for image in images]
        flow = self.traits.flow
        labels = tuple(
            self.ip_adapters.label() if is_ip_unit(unit) else self.controlnets.label(unit.model)
            for unit in request.params.control_units
        )
        texts = [
            infotext(request, seed, info.name, info.file_hash, guidance=info.guidance, flow=flow, control_labels=labels)
            for seed in job.seeds
        ]
        generated = [
            GeneratedImage(png=encode_png(image, text, request.job_id, compress_level), seed=seed)
            for image, text, seed in zip(images, texts, job.seeds, strict=False)
        ]
        return GenerationResult(request.job_id, generated, texts[0], seconds=time.monotonic() - job.started)

    # ------------------------------------------------------------------ one job, no thread

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Prepare, denoise alone, decode: one job start to end in the calling thread (one pass:
        a hires job's second pass is the worker's, :mod:`engine.features.hires`)."""
        if request.params.is_hires:
            raise GenerationError("A hires fix job runs in the engine worker, not Pipeline.generate.")
        job = self.prepare(request)
        batch = Batch(self.denoiser)
        batch.add(job)
        while not batch.entries[0].done:
            batch.step()
        latents = batch.remove(job)
        check_finite(job, latents)
        images = self.decode(latents)
        if None in images:
            raise decode_error(job)
        return self.finish(job, images)


def to_images(pixels: Tensor, invalid: Tensor) -> list[Image.Image | None]:
    """What :meth:`Pipeline.decode_pixels` gave -> RGB images, None where invalid: the uint8
    conversion and the copy to the host (the worker runs it off the engine thread)."""
    data = ((pixels.nan_to_num() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu()
    return [
        None if bad else Image.fromarray(p.permute(1, 2, 0).numpy())
        for p, bad in zip(data, invalid.tolist(), strict=False)
    ]


def nan_error(job: PreparedJob) -> GenerationError:
    return GenerationError(
        f"Job {job.request.job_id} produced invalid numbers (NaN); try a lower guidance scale or another sampler."
    )


def decode_error(job: PreparedJob) -> GenerationError:
    return GenerationError(
        f"Job {job.request.job_id}: the image decoder (VAE) produced invalid numbers (NaN) even at full "
        "precision; try another seed or a lower guidance scale."
    )


def out_of_memory_error(request: GenerationRequest) -> GenerationError:
    size = f"{request.params.width}x{request.params.height}"
    what = f"a {size} image" if request.params.count == 1 else f"{request.params.count} images of {size}"
    smaller = "a smaller size, a smaller hires factor" if request.params.is_hires else "a smaller size"
    return GenerationError(f"Out of GPU memory for {what}: try {smaller} or fewer images.")


def timeout_error(request: GenerationRequest, limit: float) -> GenerationError:
    return GenerationError(f"Job {request.job_id} took longer than {limit:g} s; try fewer steps or a smaller size.")


def check_finite(job: PreparedJob, latents: Tensor) -> None:
    """A NaN/inf in a job's latents fails that job (one host sync, at the end of the job)."""
    if not bool(torch.isfinite(latents).all()):
        raise nan_error(job)
