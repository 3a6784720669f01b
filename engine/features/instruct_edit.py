"""Edits in words with an InstructPix2Pix checkpoint (Brooks et al. 2023, "InstructPix2Pix").

Its UNet takes 8 channels: the noisy latents and the latents of the image to edit. A job on such
a model is an img2img job whose prompt is the instruction ("make it night"); like diffusers'
``StableDiffusionInstructPix2PixPipeline`` it starts from pure noise (the image steers every step
through those 4 channels, not as a noised start: ``strength`` is not read), the image's latents
are the VAE's mean *unscaled* (as that pipeline's ``prepare_image_latents``), and each image is
three UNet rows: prompt with image, negative prompt with image, negative prompt with zero image
latents, mixed with two guidance scales::

    uncond + guidance * (text - image) + image_guidance * (image - uncond)

:class:`InstructDenoiser` is the SD denoiser with those three rows; the rows' image latents and
image guidance are fields of their conditioning (``image``, ``image_guidance``), so edits of
different images, instructions and guidance share one batch like any other rows. Their steps run
eager under ``engine.compile`` (the graphs are laid out for pairs of rows). The image guidance is
the model's ``image_guidance`` setting (A1111's "Image CFG Scale", diffusers' 1.5 by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from engine.errors import GenerationError
from engine.families.checkpoints import INSTRUCT_CHANNELS
from engine.families.sd.denoiser import Conditioning, Denoiser
from engine.prompt_syntax import lora_key
from engine.sampling.samplers import rows
from engine.sampling.schedules import sigma_to_t
from engine.types import GenerationRequest

__all__ = ["INSTRUCT_CHANNELS", "InstructDenoiser", "edit_job", "edit_refusal"]
DEFAULT_IMAGE_GUIDANCE = 1.5


class InstructDenoiser(Denoiser):
    """``denoiser(x, sigma, cond) -> x0`` for an InstructPix2Pix UNet: three rows per image."""

    def compile(self, compiler: Callable[[Callable[..., Any]], Callable[..., Any]], max_graphs: int = 24) -> None:
        """Eager: the compiled graphs hold pairs of rows, these steps run three per image."""

    @torch.inference_mode()
    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: Conditioning,
        *,
        timesteps: Tensor | None = None,
        c_in: Tensor | None = None,
    ) -> Tensor:
        n = x.shape[0]
        c_in = rows(self.input_scale(sigma) if c_in is None else c_in)
        t = sigma_to_t(sigma, self.log_sigmas) if timesteps is None else timesteps[:n]
        model_in = (x * c_in).to(self.dtype)
        image = cond.image.to(self.dtype)
        with_image = torch.cat([model_in, image], dim=1)
        sample = torch.cat([with_image, with_image, torch.cat([model_in, torch.zeros_like(image)], dim=1)])

        def triple(both: Tensor | None) -> Tensor | None:  # prompt, negative, negative
            return None if both is None else torch.cat([both[:n], both[n:], both[n:]])

        added = None if cond.added is None else {key: triple(value) for key, value in cond.added.items()}
        out = self.unet(
            sample,
            torch.cat([t, t, t]),
            encoder_hidden_states=triple(cond.embeds),
            encoder_attention_mask=triple(cond.mask),
            added_cond_kwargs=added,
            return_dict=False,
        )[0].float()
        text, image_only, uncond = out[:n], out[n : 2 * n], out[2 * n :]
        guided = uncond + rows(cond.guidance) * (text - image_only) + rows(cond.image_guidance) * (image_only - uncond)
        return self.to_x0(guided, x, sigma)


def edit_refusal(request: GenerationRequest) -> str | None:
    """Why an InstructPix2Pix model cannot run this job (one line saying what to do), or None."""
    params = request.params
    if not params.is_img2img:
        return "This model edits images (InstructPix2Pix): press Edit with words under a result, or use /img2img."
    if params.is_masked or params.control_units:
        return "An edit in words changes the whole image: leave out the mask and the references."
    if lora_key(params.prompt):
        return "LoRAs are not applied to edits in words; leave out the <lora:...> tags."
    return None


class EditingPipeline(Protocol):
    """What an edit needs of the model's pipeline (engine.pipeline.Pipeline)."""

    model: Any
    device: torch.device
    dtype: torch.dtype

    def use_loras(self, request: GenerationRequest) -> None: ...
    def txt2img(self, request: GenerationRequest) -> Any: ...
    def encode_image(self, image: Image.Image) -> Tensor: ...


def edit_job(
    pipeline: EditingPipeline,
    request: GenerationRequest,
    init: Image.Image | None,
    fit_image: Callable[[bytes, int, int], Image.Image],
) -> Any:
    """An edit: a job from pure noise (a PreparedJob) whose rows carry the image's latents and
    image guidance; ``fit_image`` fits the member's image to the job's size."""
    # 1. Check what this model cannot do.
    if refusal := edit_refusal(request):
        raise GenerationError(refusal)
    pipeline.use_loras(request)  # none: the tiling
    params = request.params
    if init is None:
        init = fit_image(params.init_image, params.width, params.height)
    # 2. Prompts, sigmas and noise as for text to image: the image is no noised start.
    job = pipeline.txt2img(request)
    # 3. The image's latents, unscaled (the VAE's mean), one per image of the job.
    latents = pipeline.encode_image(init) / pipeline.model.vae_scaling_factor
    count = job.cond.rows
    guidance = getattr(pipeline.model, "image_guidance", DEFAULT_IMAGE_GUIDANCE)
    job.cond = dataclasses.replace(
        job.cond,
        image=latents.expand(count, -1, -1, -1).to(pipeline.dtype),
        image_guidance=torch.full((count,), guidance, device=pipeline.device, dtype=torch.float32),
    )
    return job
