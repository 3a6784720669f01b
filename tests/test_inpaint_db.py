"""Migration 0006: jobs stored before it read back as unmasked jobs with AUTOMATIC1111's defaults."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import Job
from db.session import make_engine, upgrade
from engine.params import GenerationParams, params_from_job

BEFORE_MASKS = "0002"  # the revision 0006 follows on this branch


def test_a_job_stored_before_the_mask_columns_reads_back_unmasked(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine, BEFORE_MASKS)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (requester_id, kind, prompt, negative_prompt, seed, steps, guidance, width, "
                    "height,"
                    " sampler, count, strength, variation_strength, status, attempts, created_at)"
                    " VALUES (1, 'img2img', 'a fox', '', 5, 20, 7.0, 512, 512, 'euler', 1, 0.5, 0.0, 'queued', 0,"
                    " '2026-11-30 12:00:00')"
                )
            )
        upgrade(engine)
        with Session(engine) as session:
            params = params_from_job(session.query(Job).one())
        defaults = GenerationParams(prompt="", seed=0)
        assert params.mask is None and not params.is_masked
        assert (params.mask_blur, params.inpaint_full_res, params.inpaint_padding, params.masked_content) == (
            defaults.mask_blur,
            defaults.inpaint_full_res,
            defaults.inpaint_padding,
            defaults.masked_content,
        )
    finally:
        engine.dispose()
