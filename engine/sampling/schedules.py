"""Noise schedules: the sigmas a job walks down, and sigma <-> UNet timestep conversion.

We work in k-diffusion's variables (Karras et al. 2022): a latent at noise level ``sigma`` is
``x = x0 + sigma * eps``, with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` for each of the
checkpoint's 1000 training timesteps. A sampler only ever sees sigmas; the denoiser turns a
sigma back into the (fractional) training timestep the UNet was trained on, interpolating in
log-sigma the way k-diffusion's ``DiscreteSchedule`` does, so any discretization works with any
checkpoint.

Every function here is pure and runs on the CPU once per job, not once per step.

DDIM is AUTOMATIC1111's (v1.6 and later, ``modules/sd_samplers_timesteps*.py``), so that a
pasted infotext makes the same image there: it walks its own grid of training timesteps, stops at
timestep 1 rather than at sigma 0, and starts and ends in the UNet's scale of the latents
(:class:`JobSchedule`), where the k-diffusion samplers start at ``noise * sigma_max`` and end clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.errors import ModelLoadError


class ModelSchedule:
    """The checkpoint's training noise levels, with sigma <-> timestep conversion."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        alphas_cumprod = alphas_cumprod.double().cpu()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # ascending with t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep for each sigma (see :func:`sigma_to_t`)."""
        return sigma_to_t(sigma.double(), self.log_sigmas.to(sigma.device))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at each fractional training timestep."""
        t = t.double()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep: linear in log-sigma between the two nearest training levels.

    Runs on the device inside the denoiser, so ``log_sigmas`` is passed in already there.
    """
    log_sigma = sigma.to(log_sigmas.dtype).clamp_min(1e-10).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Every schedule ends at sigma 0: the last step returns the clean image."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def normal_sigmas(schedule: ModelSchedule, steps: int) -> torch.Tensor:
    """k-diffusion's / AUTOMATIC1111's default: timesteps evenly spaced from the last to 0."""
    t = torch.linspace(len(schedule.sigmas) - 1, 0, steps, dtype=torch.float64)
    return append_zero(schedule.t_to_sigma(t))


def karras_sigmas(schedule: ModelSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5): evenly spaced in sigma^(1/rho), denser near sigma_min."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
    return append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def ddim_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """A1111's DDIM grid, ascending: every ``num_train // steps``-th timestep plus one, at most the last.

    For 20 steps: 1, 51, ..., 951. When ``steps`` does not divide ``num_train`` the grid has one
    more point (30 steps: 31 timesteps, 1 to 991), as A1111's ``range`` gives.
    """
    stride = max(num_train // steps, 1)
    return (torch.arange(0, num_train, stride) + 1).clamp(max=num_train - 1)


def ddim_sigmas(schedule: ModelSchedule, steps: int) -> torch.Tensor:
    """A1111's DDIM levels from the top of its grid down to timestep 1 (not to sigma 0).

    Each step evaluates the model at one grid point and moves to the next one down, so the last
    step lands on timestep 1 and A1111 decodes the latents there (:func:`latents_to_decode`):
    for 20 steps it evaluates 951, 901, ..., 51, nineteen model calls.
    """
    t = ddim_timesteps(len(schedule.sigmas), steps)
    return schedule.sigmas[t.flip(0)]


DISCRETIZATIONS = {"normal": normal_sigmas, "karras": karras_sigmas, "ddim": ddim_sigmas}
#: Discretizations whose sampler (A1111's timestep samplers) makes its first latents in the UNet's scale.
UNET_SCALE_START = frozenset({"ddim"})


@dataclass(frozen=True)
class JobSchedule:
    """The sigmas one job walks, and how its first latents are made from noise and an init image."""

    discretization: str
    #: The sigma of each step, then the one the last step lands on (float64, CPU).
    sigmas: Tensor
    #: The noise level the init image is noised to: ``sigmas[0]``, except for A1111's DDIM img2img,
    #: which noises to the grid point above the first one it evaluates (and A1111 keeps it so).
    noise_sigma: float

    def start_latents(self, noise: Tensor, init: Tensor | None = None) -> Tensor:
        """The first latents, read by the denoiser at ``sigmas[0]`` (k-diffusion's scale).

        k-diffusion samplers: ``init + noise * sigma`` (no init: pure noise at sigma_max).
        A1111's DDIM works on the UNet's input ``x * sqrt(alpha_bar)`` instead: unit noise, or the init
        image noised as ``init * sqrt(a) + noise * sqrt(1 - a)`` at ``noise_sigma``; that is turned
        into our scale at the level it is first evaluated at.
        """
        if self.discretization not in UNET_SCALE_START:
            return noise * self.noise_sigma if init is None else init + noise * self.noise_sigma
        if init is None:
            unet_latents = noise
        else:
            level = math.sqrt(1 + self.noise_sigma**2)  # 1 / sqrt(alpha_bar) at noise_sigma
            unet_latents = init / level + noise * (self.noise_sigma / level)
        return unet_latents * math.sqrt(1 + float(self.sigmas[0]) ** 2)


def latents_to_decode(latents: Tensor, last_sigma: float) -> Tensor:
    """What the VAE decodes: the latents in the UNet's scale at the last sigma.

    At sigma 0 (every k-diffusion schedule) that is the latents themselves. A1111's DDIM stops at
    timestep 1 and decodes ``x * sqrt(alpha_bar)`` there, still holding that step's bit of noise.
    """
    return latents if last_sigma == 0 else latents / math.sqrt(1 + last_sigma**2)


def job_schedule(
    schedule: ModelSchedule,
    discretization: str,
    steps: int,
    strength: float | None = None,
    *,
    schedule_type: str = "automatic",
    discard_penultimate: bool = False,
) -> JobSchedule:
    """The schedule one job walks, from its start noise level down.

    img2img (``strength`` given) starts part-way down the full schedule, as AUTOMATIC1111 does:
    ``int(strength * steps)`` steps are skipped from the noisy end, so the init image keeps
    ``1 - strength`` of its structure and the job runs ``int(strength * steps) + 1`` steps.
    A1111's DDIM keeps ``int(strength * steps)`` grid points, noises the image to the next one up
    and evaluates the ones kept (one step fewer). ``schedule_type`` and ``discard_penultimate``:
    see :func:`member_sigmas` (DDIM keeps its own timesteps).
    """
    if discretization in UNET_SCALE_START:
        return _ddim_schedule(schedule, DISCRETIZATIONS[discretization](schedule, steps), steps, strength)
    sigmas = member_sigmas(schedule, discretization, schedule_type, steps, strength, discard_penultimate)
    return JobSchedule(discretization, sigmas, float(sigmas[0]))


def _ddim_schedule(schedule: ModelSchedule, grid: Tensor, steps: int, strength: float | None) -> JobSchedule:
    if strength is None:
        sigmas, noise_sigma = grid, float(grid[0])
    else:
        kept = int(min(strength, 0.999) * steps)
        sigmas = grid[len(grid) - kept :]
        noise_sigma = float(grid[len(grid) - kept - 1])
    if len(sigmas) < 2:
        # A1111 calls the model zero times here (1 step, or strength * steps under 2) and decodes
        # the noise itself; a job always takes a step, from where its latents are to timestep 1.
        start = schedule.sigmas[-1] if strength is None else noise_sigma
        sigmas, noise_sigma = torch.stack([torch.as_tensor(start, dtype=grid.dtype), schedule.sigmas[1]]), float(start)
    return JobSchedule("ddim", sigmas, noise_sigma)


def job_sigmas(schedule: ModelSchedule, discretization: str, steps: int, strength: float | None = None) -> torch.Tensor:
    """The sigmas of :func:`job_schedule` alone."""
    return job_schedule(schedule, discretization, steps, strength).sigmas


def img2img_tail(sigmas: torch.Tensor, steps: int, strength: float | None) -> torch.Tensor:
    """The part of a full schedule that an img2img job of ``strength`` walks (all of it for txt2img)."""
    if strength is None:
        return sigmas
    denoise_steps = int(min(strength, 0.999) * steps)
    return sigmas[steps - denoise_steps - 1 :]


# ---------------------------------------------------------------------------- schedule types
# A member picks a schedule type apart from the sampler, as in AUTOMATIC1111 since v1.9
# (its modules/sd_schedulers.py). "automatic" is the sampler's own choice.


def exponential_sigmas(schedule: ModelSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in log-sigma from sigma_max to sigma_min (k-diffusion's get_sigmas_exponential)."""
    log_sigmas = torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps, dtype=torch.float64)
    return append_zero(log_sigmas.exp())


def sgm_uniform_sigmas(schedule: ModelSchedule, steps: int) -> torch.Tensor:
    """Stability AI's (SGM) uniform timesteps: ``steps + 1`` evenly from the top, the last (t = 0) left out."""
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max, dtype=torch.float64))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min, dtype=torch.float64))
    t = torch.linspace(float(start), float(end), steps + 1, dtype=torch.float64)[:-1]
    return append_zero(schedule.t_to_sigma(t))


def simple_sigmas(schedule: ModelSchedule, steps: int) -> torch.Tensor:
    """Every (1000 / steps)-th training level from the top, without interpolation (ComfyUI's "simple")."""
    stride = len(schedule.sigmas) / steps
    picked = [schedule.sigmas[-(1 + int(i * stride))] for i in range(steps)]
    return append_zero(torch.stack(picked))


def lcm_sigmas(schedule: ModelSchedule, steps: int, original_steps: int = 50) -> torch.Tensor:
    """AUTOMATIC1111's LCM levels: the 50 training levels an LCM was distilled on (timesteps 19, 39,
    ..., 999), walked evenly from the top one to the bottom one, log-sigma interpolated between them."""
    skip = len(schedule.sigmas) // original_steps
    log_sigmas = schedule.log_sigmas[skip - 1 :: skip]
    position = torch.linspace(len(log_sigmas) - 1, 0, steps, dtype=torch.float64)
    low, high, w = position.floor().long(), position.ceil().long(), position.frac()
    return append_zero(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp())


#: Schedule ids -> the function that makes them; "automatic" (the sampler's own) is resolved first.
SCHEDULES = {
    "uniform": normal_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
}


#: Automatic schedules of a sampler's own, not offered as a schedule type (AUTOMATIC1111 neither).
SAMPLER_OWN = {"lcm": lcm_sigmas}


def member_sigmas(
    schedule: ModelSchedule,
    discretization: str,
    schedule_type: str,
    steps: int,
    strength: float | None = None,
    discard_penultimate: bool = False,
) -> torch.Tensor:
    """The sigmas one job walks for a sampler (its automatic ``discretization``) and a schedule type.

    ``discard_penultimate``: make ``steps + 1`` levels and drop the one before 0, as AUTOMATIC1111
    does for DPM2, DPM2 a and DPM++ 3M SDE (their last real step would otherwise be tiny). DDIM
    keeps its own timesteps whatever the schedule type, as AUTOMATIC1111's timestep samplers do.
    """
    if schedule_type == "automatic" or discretization == "ddim":
        schedule_type = discretization
    make = DISCRETIZATIONS.get(schedule_type) or SCHEDULES.get(schedule_type) or SAMPLER_OWN[schedule_type]
    if discard_penultimate:
        sigmas = make(schedule, steps + 1)
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    else:
        sigmas = make(schedule, steps)
    return img2img_tail(sigmas, steps, strength)


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """The training noise schedule (float64, one value per timestep) from a scheduler config."""
    steps = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas"):
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif schedule == "scaled_linear":  # what every Stable Diffusion release uses
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=torch.float64,
        )
    else:
        raise ModelLoadError(
            f"beta_schedule {schedule!r} is not supported (expected linear, scaled_linear or squaredcos_cap_v2)."
        )
    return torch.cumprod(1 - betas, dim=0)
