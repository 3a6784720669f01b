"""Migration 0008: jobs stored before it (old upscales included) read back with no upscaler."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import Job
from db.session import make_engine, upgrade
from engine.params import params_from_job

BEFORE_UPSCALERS = "0007"


def test_a_job_stored_before_the_upscaler_columns_has_no_upscaler(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine, BEFORE_UPSCALERS)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (requester_id, kind, prompt, negative_prompt, seed, steps, guidance, width, "
                    "height, sampler, count, strength, variation_strength, status, attempts, created_at)"
                    " VALUES (1, 'upscale', 'a fox', '', 5, 20, 7.0, 1024, 1024, 'euler', 1, 0.4, 0.0, 'queued', 0,"
                    " '2026-11-30 12:00:00')"
                )
            )
        upgrade(engine)
        with Session(engine) as session:
            params = params_from_job(session.query(Job).one())
        # Its init image was enlarged by the bot already: the engine fits it as it is and runs img2img.
        assert params.upscaler is None and params.upscale_only is False
    finally:
        engine.dispose()
