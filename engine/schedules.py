"""Noise schedules: the sigmas a job walks down, and sigma <-> UNet timestep conversion.

We work in k-diffusion's variables (Karras et al. 2022): a latent at noise level ``sigma`` is
``x = x0 + sigma * eps``, with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` for each of the
checkpoint's 1000 training timesteps. A sampler only ever sees sigmas; the denoiser turns a
sigma back into the (fractional) training timestep the UNet was trained on, interpolating in
log-sigma the way k-diffusion's ``DiscreteSchedule`` does, so any discretization works with any
checkpoint.

Every function here is pure and runs on the CPU once per job, not once per step.
"""

from __future__ import annotations

import torch


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


def ddim_sigmas(schedule: ModelSchedule, steps: int) -> torch.Tensor:
    """DDIM's "uniform" timesteps as latent-diffusion spaces them: every (1000 // steps)-th, plus one."""
    num_train = len(schedule.sigmas)
    stride = max(num_train // steps, 1)
    t = (torch.arange(0, num_train, stride, dtype=torch.float64)[:steps] + 1).clamp(max=num_train - 1)
    return append_zero(schedule.t_to_sigma(t.flip(0)))


DISCRETIZATIONS = {"normal": normal_sigmas, "karras": karras_sigmas, "ddim": ddim_sigmas}


def job_sigmas(schedule: ModelSchedule, discretization: str, steps: int, strength: float | None = None) -> torch.Tensor:
    """The sigmas one job walks, from its start noise level down to 0.

    img2img (``strength`` given) starts part-way down the full schedule, as AUTOMATIC1111 does:
    ``int(strength * steps)`` steps are skipped from the noisy end, so the init image keeps
    ``1 - strength`` of its structure and the job runs ``int(strength * steps) + 1`` steps.
    """
    sigmas = DISCRETIZATIONS[discretization](schedule, steps)
    if strength is None:
        return sigmas
    denoise_steps = int(min(strength, 0.999) * steps)
    return sigmas[steps - denoise_steps - 1 :]
