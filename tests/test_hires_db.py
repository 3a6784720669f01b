"""Migration 0007: jobs stored before it read back without a hires fix; members and servers keep the bot's defaults."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import Job, MemberSettings, ServerSettings
from db.session import make_engine, upgrade
from engine.params import GenerationParams, params_from_job


def test_rows_stored_before_the_hires_columns_read_back_without_one(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0006")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (requester_id, kind, prompt, negative_prompt, seed, steps, guidance, width,"
                    " height, sampler, count, strength, variation_strength, status, attempts, created_at, clip_skip,"
                    " mask_blur, inpaint_full_res, inpaint_padding, masked_content, schedule)"
                    " VALUES (1, 'txt2img', 'a fox', '', 5, 20, 7.0, 512, 512, 'euler', 1, 0.5, 0.0, 'queued', 0,"
                    " '2026-11-30 12:00:00', 1, 4, false, 32, 'original', 'automatic')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO member_settings (user_id, private_results, updated_at) VALUES (1, false, '2026-11-30')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO server_settings (guild_id, allowed_channel_ids, cooldown_seconds, nsfw_words, paused,"
                    " updated_at) VALUES (9, '[]', 0, '[]', false, '2026-11-30')"
                )
            )
        upgrade(engine)
        with Session(engine) as session:
            params = params_from_job(session.query(Job).one())
            member, server = session.get(MemberSettings, 1), session.get(ServerSettings, 9)
        defaults = GenerationParams(prompt="", seed=0)
        assert params.hires_scale is None and not params.is_hires
        assert (params.hires_steps, params.hires_upscaler, params.hires_strength) == (
            defaults.hires_steps,
            defaults.hires_upscaler,
            defaults.hires_strength,
        )
        assert (member.schedule, member.hires_scale, member.hires_upscaler) == (None, None, None)
        assert server.clip_skip is None
    finally:
        engine.dispose()
