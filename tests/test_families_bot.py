"""What the bot knows of a model's family without loading it, and the defaults, choices and
refusals it takes from it (issue 21 point 8): torch-free in the bot's process."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot.inputs import BadInput
from bot.policy import Asked, resolve
from db.community_values import MemberDefaults, ServerPolicy
from engine.config.settings import GenerationSettings, ModelSettings
from engine.families.detect import source_family

GEN = GenerationSettings(default_negative_prompt="blurry", sdxl_sizes=("1024x1024", "1152x896", "1000x1000"))


def test_flux_dev_takes_its_own_sizes_steps_guidance_samplers_and_no_negative_prompt():
    gen = GEN.for_family("flux", "distilled")
    assert gen.family == "flux" and gen.pixel_multiple == 16
    assert gen.sizes == ("1024x1024", "1152x896")  # 1000 is not a multiple of 16
    assert (gen.default_width, gen.default_height) == (1024, 1024)
    assert (gen.default_steps, gen.default_guidance, gen.default_sampler) == (28, 3.5, "euler")
    assert set(gen.samplers) == {"euler", "heun", "lms", "dpm2", "dpmpp_2m"}
    assert gen.schedules == ("automatic",) and gen.default_negative_prompt == ""


def test_flux_schnell_takes_four_steps_and_a_models_table_comes_first():
    assert GEN.for_family("flux", "none").default_steps == 4
    model = ModelSettings(source="x", default_steps=12, default_guidance=2.0, default_sampler="heun")
    gen = GEN.for_family("flux", "distilled", model)
    assert (gen.default_steps, gen.default_guidance, gen.default_sampler) == (12, 2.0, "heun")
    sd3 = GEN.for_family("sd3")
    assert (sd3.default_steps, sd3.default_guidance, sd3.default_negative_prompt) == (28, 4.5, "blurry")


def test_the_sd_families_keep_the_configured_settings():
    assert replace(GEN.for_family("sd1"), family="", pixel_multiple=8) == GEN
    assert GEN.for_family("sdxl").sizes == GEN.sdxl_sizes  # SDXL's grid is 8: 1000x1000 stays


def test_derived_settings_are_not_read_from_the_file(tmp_path):
    from engine.config.settings import ConfigError, parse_engine_sections

    with pytest.raises(ConfigError, match="generation.family: unknown key"):
        parse_engine_sections({"generation": {"family": "flux"}})


def test_a_models_family_is_read_from_its_folder_or_file(tmp_path):
    from tinyflow import save_flux_folder, save_sd3_folder
    from tinymodel import save_diffusers_folder

    assert source_family(str(save_flux_folder(tmp_path / "dev"))) == ("flux", "distilled")
    assert source_family(str(save_flux_folder(tmp_path / "schnell", guidance_embeds=False))) == ("flux", "none")
    assert source_family(str(save_sd3_folder(tmp_path / "sd3"))) == ("sd3", "cfg")
    assert source_family(str(save_diffusers_folder(tmp_path / "sd1", "sd1"))) == ("sd1", "cfg")
    assert source_family("black-forest-labs/FLUX.1-dev") is None  # a hub id: not fetched to find out
    assert source_family("black-forest-labs/FLUX.1-dev", "flux") == ("flux", "distilled")


def settings_for(model: str | None) -> GenerationSettings:
    return GEN.for_family("flux", "distilled") if model == "flux" else GEN.for_family("sd1")


def asked_of(**options) -> Asked:
    return Asked("a fox", model="flux", **options)


def test_a_flux_job_among_sd_models_takes_flux_defaults_and_drops_a_members_sd_defaults():
    mine = MemberDefaults(negative_prompt="lowres", sampler="euler_a", steps=20)
    params = resolve(asked_of(), mine, ServerPolicy(), GEN, ("sd", "flux"), generation_for=settings_for)
    assert (params.model, params.negative_prompt, params.sampler, params.guidance) == ("flux", "", "euler", 3.5)
    assert (params.width, params.height, params.steps) == (1024, 1024, 20)
    sd = resolve(Asked("a fox"), mine, ServerPolicy(), GEN, ("sd", "flux"), generation_for=settings_for)
    assert (sd.negative_prompt, sd.sampler) == ("lowres", "euler_a")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(negative="blurry"), "no negative prompt"),
        (dict(sampler="euler_a"), "cannot use the euler_a sampler"),
        (dict(schedule="karras"), "own schedule"),
        (dict(clip_skip=2), "CLIP skip does not apply"),
        (dict(size=(1000, 1000)), "multiples of 16"),
    ],
)
def test_what_flux_cannot_do_is_refused_at_the_boundary(options, words):
    with pytest.raises(BadInput, match=words):
        resolve(asked_of(**options), MemberDefaults(), ServerPolicy(), GEN, ("sd", "flux"), generation_for=settings_for)


def test_a_hires_factor_off_the_16_pixel_grid_is_refused_with_one_that_fits():
    from bot.policy import hires_gate

    flux = settings_for("flux")
    params = resolve(
        asked_of(hires=1.2),
        MemberDefaults(),
        ServerPolicy(),
        replace(GEN, max_width=2048, max_height=2048),
        ("sd", "flux"),
        generation_for=lambda m: replace(flux, max_width=2048, max_height=2048),
    )
    with pytest.raises(BadInput, match="16-pixel grid.*1.5 or 2"):
        hires_gate(params, ServerPolicy(), replace(flux, max_width=2048, max_height=2048))
    hires_gate(params.but(hires_scale=1.5), ServerPolicy(), replace(flux, max_width=2048, max_height=2048))


def test_help_and_server_show_list_each_models_family_and_defaults():
    from bot.config import Config, DiscordSettings
    from bot.texts import models_text
    from engine.config.settings import EngineSettings, QueueSettings

    config = Config(
        model=ModelSettings(source="sd", name="sd"),
        engine=EngineSettings(),
        generation=GEN.for_family("sd1"),
        queue=QueueSettings(),
        discord=DiscordSettings(),
        token="t",
        models=(ModelSettings(source="flux", name="flux"),),
        by_model=(("sd", GEN.for_family("sd1")), ("flux", GEN.for_family("flux", "distilled"))),
    )
    text = models_text(config)
    assert "**sd** (SD 1.x): 25 steps; guidance 7" in text
    assert "**flux** (Flux.1): 28 steps; distilled guidance 3.5; Euler; 1024x1024 (sizes in multiples of 16)" in text
    assert "no negative prompt; no CLIP skip" in text


def test_a_flux_prompt_with_a1111_emphasis_gets_a_note_not_silence():
    from bot.inputs import flow_prompt_note

    assert "do not apply" in flow_prompt_note("a (red:1.3) fox", "Flux.1")
    assert "do not apply" in flow_prompt_note("a fox BREAK a hen", "Flux.1")
    assert flow_prompt_note("a red fox <lora:style:0.8>", "Flux.1") is None
