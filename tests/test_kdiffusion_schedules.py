"""Schedule types against k-diffusion's get_sigmas_* and AUTOMATIC1111's formulas (modules/sd_schedulers.py),
which run on k-diffusion's DiscreteSchedule of the model's training sigmas (tests/kdiffusion_ref)."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from engine.errors import GenerationError
from engine.params import AUTOMATIC_SCHEDULES, SCHEDULE_NAMES, GenerationParams
from engine.pipeline import Pipeline
from engine.sampling.samplers import SAMPLERS
from engine.sampling.schedules import SCHEDULES, ModelSchedule, member_sigmas
from engine.types import GenerationRequest
from kdiffusion_ref import external
from kdiffusion_ref import sampling as K

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
CLOSE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return EulerDiscreteScheduler(**SD_BETAS).alphas_cumprod


@pytest.fixture(scope="module")
def schedule(alphas_cumprod) -> ModelSchedule:
    return ModelSchedule(alphas_cumprod)


@pytest.fixture(scope="module")
def inner_model(alphas_cumprod) -> external.DiscreteSchedule:
    """What AUTOMATIC1111 calls inner_model: k-diffusion's CompVisDenoiser, a DiscreteSchedule."""
    return external.DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize=False)


def a1111_sgm_uniform(n, inner_model):
    start = inner_model.sigma_to_t(inner_model.sigma_max)
    end = inner_model.sigma_to_t(inner_model.sigma_min)
    return torch.tensor([float(inner_model.t_to_sigma(t)) for t in torch.linspace(start, end, n + 1)[:-1]] + [0.0])


def a1111_simple(n, inner_model):
    stride = len(inner_model.sigmas) / n
    return torch.tensor([float(inner_model.sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0])


@pytest.mark.parametrize("steps", [1, 7, 20, 33])
def test_schedule_types_match_the_references(schedule, inner_model, steps):
    sigma_min, sigma_max = float(inner_model.sigma_min), float(inner_model.sigma_max)
    references = {
        "uniform": inner_model.get_sigmas(steps),
        "karras": K.get_sigmas_karras(steps, sigma_min, sigma_max),
        "exponential": K.get_sigmas_exponential(steps, sigma_min, sigma_max),
        "sgm_uniform": a1111_sgm_uniform(steps, inner_model),
        "simple": a1111_simple(steps, inner_model),
    }
    assert references.keys() == SCHEDULES.keys()
    for name, reference in references.items():
        ours = member_sigmas(schedule, "normal", name, steps).float()
        assert len(ours) == steps + 1, name
        torch.testing.assert_close(ours, reference.float(), **CLOSE, msg=name)


def test_automatic_is_each_samplers_own_schedule(schedule, inner_model):
    """AUTOMATIC1111's defaults: Karras for DPM++ 2M, DPM++ SDE, DPM2 and DPM2 a, Exponential for the
    multistep SDE samplers, Uniform for Euler, Heun and LMS."""
    sigma_min, sigma_max = float(inner_model.sigma_min), float(inner_model.sigma_max)
    karras, exponential = (
        K.get_sigmas_karras(12, sigma_min, sigma_max),
        K.get_sigmas_exponential(12, sigma_min, sigma_max),
    )
    expected = {
        "dpmpp_2m": karras,
        "dpmpp_sde": karras,
        "dpmpp_2m_sde": exponential,
        "euler": inner_model.get_sigmas(12),
        "heun": inner_model.get_sigmas(12),
        "lms": inner_model.get_sigmas(12),
    }
    for name, reference in expected.items():
        ours = member_sigmas(schedule, SAMPLERS[name].discretization, "automatic", 12).float()
        torch.testing.assert_close(ours, reference, **CLOSE, msg=name)


def test_lcm_automatic_schedule_is_automatic1111s(schedule, alphas_cumprod):
    """AUTOMATIC1111's LCMCompVisDenoiser: the 50 levels at timesteps 19, 39, ..., 999 in a
    DiscreteSchedule, walked from t = 999 to t = 19 (its timestep <-> index mapping undone here)."""
    valid = torch.zeros(50)
    for x in range(50):
        valid[49 - x] = alphas_cumprod[999 - x * 20]
    lcm = external.DiscreteSchedule(((1 - valid) / valid) ** 0.5, quantize=False)
    for steps in (1, 4, 8):
        index = (torch.linspace(999, 19, steps) - 19) / 20  # its t_to_sigma's clamp((t - 19) / 20)
        reference = K.append_zero(lcm.t_to_sigma(index))
        ours = member_sigmas(schedule, SAMPLERS["lcm"].discretization, "automatic", steps).float()
        torch.testing.assert_close(ours, reference, **CLOSE)


@pytest.mark.parametrize("name", ["dpm2", "dpm2_a", "dpmpp_3m_sde"])
def test_discard_next_to_last_sigma(schedule, name):
    """AUTOMATIC1111 makes steps + 1 levels and drops the one before 0 for these samplers."""
    sampler = SAMPLERS[name]
    full = member_sigmas(schedule, sampler.discretization, "automatic", 11)
    ours = member_sigmas(schedule, sampler.discretization, "automatic", 10, discard_penultimate=True)
    torch.testing.assert_close(ours, torch.cat([full[:-2], full[-1:]]))
    assert sampler.discard_penultimate


def test_ddim_keeps_its_own_timesteps(schedule):
    assert torch.equal(member_sigmas(schedule, "ddim", "karras", 10), member_sigmas(schedule, "ddim", "automatic", 10))


def test_img2img_takes_the_tail_of_the_chosen_schedule(schedule):
    full = member_sigmas(schedule, "normal", "exponential", 20)
    assert torch.equal(member_sigmas(schedule, "normal", "exponential", 20, strength=0.5), full[-12:])


def test_an_unknown_schedule_type_is_a_clear_error(tiny_model):
    request = GenerationRequest.of(1, prompt="a fox", seed=1, steps=2, width=64, height=64, schedule="beta")
    with pytest.raises(GenerationError, match="Unknown schedule type 'beta'; use automatic or one of"):
        Pipeline(tiny_model).prepare(request)


def test_the_infotexts_automatic_schedules_are_the_samplers():
    """engine.params keeps a torch-free copy of each sampler's automatic schedule for the infotext."""
    assert AUTOMATIC_SCHEDULES.keys() == SAMPLERS.keys()
    for name, sampler in SAMPLERS.items():
        expected = {"ddim": None, "normal": "uniform"}.get(sampler.discretization, sampler.discretization)
        assert AUTOMATIC_SCHEDULES[name] == expected, name
    assert set(SCHEDULE_NAMES) == {"automatic", *SCHEDULES}


@pytest.mark.parametrize(
    ("sampler", "schedule", "label"),
    [
        ("dpmpp_2m", "automatic", "Karras"),
        ("dpmpp_2m_sde", "automatic", "Exponential"),
        ("euler", "automatic", None),
        ("euler", "uniform", "Uniform"),
        ("heun", "sgm_uniform", "SGM Uniform"),
        ("lms", "simple", "Simple"),
        ("ddim", "karras", None),
        ("lcm", "automatic", None),
        ("lcm", "karras", "Karras"),
    ],
)
def test_schedule_type_label_as_automatic1111_writes_it(sampler, schedule, label):
    assert GenerationParams(prompt="", seed=0, sampler=sampler, schedule=schedule).schedule_label == label
