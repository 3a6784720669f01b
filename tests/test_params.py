"""One typed value for a job's parameters: every field has its column, and every mapping keeps it."""

from __future__ import annotations

from db.models import Job
from engine.config.settings import GenerationSettings
from engine.control_units import CONTROL_MODES, ControlUnit
from engine.params import PARAM_NAMES, GenerationParams, job_columns, params_from_job
from engine.serving.runner import request_from_job

#: Columns of ``jobs`` that are not generation parameters (who, where, queue and delivery state).
BOOKKEEPING = {
    "id",
    # The image filter's verdict on the results (migration 0009), not a generation parameter.
    "safety_flagged",
    "safety_label",
    "safety_score",
    "safety_action",
    "safety_review",
    "requester_id",
    "guild_id",
    "channel_id",
    "kind",
    "parent_id",
    "status",
    "attempts",
    "worker_id",
    "lease_until",
    "created_at",
    "started_at",
    "engine_started_at",
    "finished_at",
    "error",
    "interaction_token",
    "interaction_app_id",
    "interaction_expires_at",
    "status_message_id",
    "status_channel_id",
    "posted_at",
}


def unusual_params() -> GenerationParams:
    """A value whose every field differs from the type's default, so a dropped field shows."""
    values = dict(
        prompt="a fox <lora:x:0.5>",
        seed=123,
        negative_prompt="blurry",
        steps=9,
        guidance=3.5,
        width=640,
        height=384,
        sampler="ddim",
        count=3,
        init_image=b"png",
        strength=0.3,
        variation_seed=77,
        variation_strength=0.25,
        model="other",
        clip_skip=2,
        mask=b"mask png",
        mask_blur=9,
        inpaint_full_res=True,
        inpaint_padding=8,
        masked_content="fill",
        schedule="karras",
        hires_scale=1.5,
        hires_steps=12,
        hires_upscaler="Lanczos",
        hires_strength=0.45,
        upscaler="4x-tiny",
        upscale_only=True,
        prompt_template="a {red|blue} fox",
        tiling=True,
        chaos=40,
        control_units=(
            ControlUnit("canny-tiny", b"edges png", "canny", 0.6, 0.1, 0.8, CONTROL_MODES[2], "Just Resize"),
            ControlUnit("depth-tiny", b"depth png"),
        ),
    )
    assert set(values) == set(PARAM_NAMES), "add the new parameter to unusual_params"
    params = GenerationParams(**values)
    defaults = GenerationParams(prompt="", seed=0)
    for name in PARAM_NAMES:
        assert getattr(params, name) != getattr(defaults, name), name
    return params


def test_every_parameter_has_a_column_and_every_parameter_like_column_a_field():
    columns = {c.key for c in Job.__table__.columns}
    assert set(PARAM_NAMES) <= columns, f"columns missing for {set(PARAM_NAMES) - columns}"
    assert columns - set(PARAM_NAMES) <= BOOKKEEPING, (
        f"columns with no parameter: {columns - set(PARAM_NAMES) - BOOKKEEPING}"
    )


def test_job_row_round_trip_keeps_every_field():
    params = unusual_params()
    job = Job(**job_columns(params))
    assert params_from_job(job) == params
    request = request_from_job(job)
    assert request.params == params


def test_configured_defaults_fill_only_what_was_left_out():
    gen = GenerationSettings(
        default_steps=30,
        default_guidance=5.0,
        default_width=768,
        default_height=512,
        default_sampler="ddim",
        default_negative_prompt="ugly",
        default_strength=0.5,
    )
    filled = gen.params("a fox", seed=1)
    assert (
        filled.steps,
        filled.guidance,
        filled.size,
        filled.sampler,
        filled.negative_prompt,
        filled.strength,
        filled.count,
    ) == (30, 5.0, (768, 512), "ddim", "ugly", 0.5, 1)
    given = gen.params(
        "a fox",
        seed=1,
        steps=4,
        guidance=0.0,
        size=(512, 768),
        sampler="euler",
        negative_prompt="",
        count=2,
        strength=0.9,
        model="m",
    )
    assert (
        given.steps,
        given.guidance,
        given.size,
        given.sampler,
        given.negative_prompt,
        given.count,
        given.strength,
        given.model,
    ) == (4, 0.0, (512, 768), "euler", "", 2, 0.9, "m")
    assert 0 <= gen.params("a fox").seed < 2**32
