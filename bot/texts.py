"""Texts of /settings, /server and /stats: pure functions from stored settings to messages."""

from __future__ import annotations

from typing import Any

from bot import render
from bot.config import Config
from db.community import MemberDefaults, ServerPolicy, ServerStats
from engine.config.settings import GenerationSettings
from engine.families import FAMILIES
from engine.params import DEFAULT_HIRES_UPSCALER, SAMPLER_NAMES, SCHEDULE_NAMES


def member_settings_text(mine: MemberDefaults, gen: GenerationSettings) -> str:
    def shown(value: Any, default: str) -> str:
        return f"**{value}**" if value not in (None, "") else f"{default} *(bot default)*"

    size = f"{mine.width}x{mine.height}" if mine.width else None
    hires = None
    if mine.hires_scale:  # 1 is "off", even over a default that would be on
        hires = (
            "off"
            if mine.hires_scale <= 1
            else f"{mine.hires_scale:g}× ({mine.hires_upscaler or DEFAULT_HIRES_UPSCALER})"
        )
    elif mine.hires_upscaler:
        hires = f"off (upscaler {mine.hires_upscaler} when on)"
    return "\n".join(
        [
            "**Your defaults** (used when you leave an option out)",
            "negative: "
            f"{shown(render.escape(mine.negative_prompt or ''), repr(gen.default_negative_prompt or 'none'))}",
            f"steps: {shown(mine.steps, str(gen.default_steps))}",
            f"size: {shown(size, f'{gen.default_width}x{gen.default_height}')}",
            "sampler: "
            f"{shown(SAMPLER_NAMES.get(mine.sampler or '', mine.sampler), SAMPLER_NAMES[gen.default_sampler])}",
            f"guidance: {shown(mine.guidance, f'{gen.default_guidance:g}')}",
            "schedule: "
            f"{shown(SCHEDULE_NAMES.get(mine.schedule or '', mine.schedule), SCHEDULE_NAMES[gen.default_schedule])}",
            f"hires fix (/imagine): {shown(hires, 'off')}",
            f"private results: **{'yes' if mine.private_results else 'no'}**",
        ]
    )


def model_line(name: str, config: Config) -> str:
    """One configured model: its family and the defaults and choices its jobs take (issue 21)."""
    gen = config.generation_for(name)
    traits = FAMILIES.get(gen.family)
    label = traits.label if traits else "Stable Diffusion"
    parts = [
        f"{gen.default_steps} steps",
        f"{'distilled guidance' if gen.family == 'flux' else 'guidance'} {gen.default_guidance:g}",
        f"{SAMPLER_NAMES.get(gen.default_sampler, gen.default_sampler)}",
        f"{gen.default_width}x{gen.default_height} (sizes in multiples of {gen.pixel_multiple})",
    ]
    if traits and traits.samplers is not None:
        parts.append("samplers " + ", ".join(gen.samplers))
    if traits and not traits.negative_prompt:
        parts.append("no negative prompt")
    if traits and not traits.clip_skip:
        parts.append("no CLIP skip")
    return f"**{render.escape(name)}** ({label}): " + "; ".join(parts)


def models_text(config: Config) -> str:
    """Every configured model with its family's defaults (/help, /server show); the edit model
    (``discord.edit_model``) as what it is for."""
    return "\n".join(
        f"**{render.escape(name)}**: InstructPix2Pix, for 🪄 **Edit with words** under results (say what to change)"
        if name == config.discord.edit_model
        else model_line(name, config)
        for name in config.model_names
    )


def server_settings_text(policy: ServerPolicy, barred: list[int], config: Config) -> str:
    gen, queue = config.generation, config.queue

    def limit(value: Any, configured: Any) -> str:
        return f"**{value}**" if value is not None else f"{configured} *(bot limit)*"

    size = f"{policy.max_width}x{policy.max_height}" if policy.max_width else None
    channels = ", ".join(f"<#{c}>" for c in policy.allowed_channel_ids) or "every channel"
    models_own = "each model's own"
    lines = [
        f"**Server settings**{' — ⏸️ queue paused' if policy.paused else ''}",
        f"channels: {channels}",
        f"max steps: {limit(policy.max_steps, gen.max_steps)}; max size: "
        f"{limit(size, f'{gen.max_width}x{gen.max_height}')}; max count: {limit(policy.max_count, gen.max_count)}",
        f"jobs waiting per member: {limit(policy.pending_limit, queue.pending_limit)}; "
        f"per 24 hours: {limit(policy.daily_limit, 'no limit')}; "
        f"cooldown: **{policy.cooldown_seconds} s**",
        f"NSFW words (only in age-restricted channels): {render.escape(', '.join(policy.nsfw_words)) or 'none'}",
        f"default model: {limit(policy.default_model, config.model.display_name)}; "
        f"CLIP skip: {limit(policy.clip_skip, models_own)}",
        f"barred members: {', '.join(f'<@{u}>' for u in barred) or 'none'}",
        f"reference modes turned off: {', '.join(policy.reference_modes_off) or 'none'}",
        safety_settings_line(policy, config),
        "**Models**",
        models_text(config),
    ]
    return "\n".join(lines)


def safety_settings_line(policy: ServerPolicy, config: Config) -> str:
    """The image filter's line of /server show (``/server safety``)."""
    safety = config.safety
    if not safety.enabled:
        return "image filter: off *(no classifier configured)*"
    mode = f"**{policy.safety_mode}**" if policy.safety_mode else f"{safety.mode} *(bot default)*"
    labels = ", ".join(policy.safety_labels or safety.labels)
    threshold = policy.safety_threshold if policy.safety_threshold is not None else safety.threshold
    reports = policy.reports_to_hide or safety.reports_to_hide
    strikes = f"barred after {policy.strikes} withheld" if policy.strikes else "no strikes"
    return (
        f"image filter: {mode} for {render.escape(labels)} at {threshold:g} outside age-restricted channels; "
        f"Reveal by DM: {'yes' if policy.reveal_in_dm else 'no'}; hidden after {reports} reports; {strikes}"
    )


def stats_text(stats: ServerStats, member_name: Any) -> str:
    def seconds(value: float | None) -> str:
        return "no finished jobs yet" if value is None else f"{value:.1f} s"

    status = ", ".join(f"{n} {name}" for name, n in sorted(stats.week_by_status.items()))
    top = "\n".join(f"{i}. {member_name(user_id)}: {n}" for i, (user_id, n) in enumerate(stats.top_members, 1))
    return "\n".join(
        [
            f"**Jobs today:** {stats.jobs_today} · **this week:** {stats.jobs_week}"
            + (f" ({status})" if status else ""),
            f"**Average wait:** {seconds(stats.avg_wait_seconds)} · "
            f"**average generation:** {seconds(stats.avg_generation_seconds)}",
            f"**Queue now:** {stats.queued_here} waiting and {stats.running_here} running here; "
            f"{stats.queued_everywhere} waiting on all servers",
            "**Image filter this week:** "
            + (", ".join(f"{n} {action}" for action, n in sorted(stats.safety_week.items())) or "nothing checked")
            + f"; {stats.reported_week} reported",
            "**Top members this week:**",
            top or "nobody yet",
            "*Days and weeks are in UTC; weeks start on Monday.*",
        ]
    )


def audit_text(entries: list[Any]) -> str:
    if not entries:
        return "No changes have been made yet."
    lines = []
    for e in entries:
        ts = int(e.created_at.timestamp())
        target = f" <@{e.target_id}>" if e.target_id else ""
        change = f"{render.escape(e.old_value or '—')} → {render.escape(e.new_value or '—')}"
        actor = "the image filter" if e.actor_id == 0 else f"<@{e.actor_id}>"
        lines.append(f"<t:{ts}:f> {actor} **{e.action}**{target}: {render.excerpt(change, 120)}")
    return render.clip("\n".join(lines), 1900)
