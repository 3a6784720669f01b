"""The image policy, pure: whether an image is flagged, and what a flagged result becomes where.

A server's policy is its ``/server safety`` choices over ``[safety]``'s defaults
(:func:`policy_for`). An image is flagged when one of the policy's labels scores at least its
threshold; an image the classifier could not read is flagged too (fail closed). A job is as
flagged as its worst image, and its score is that image's.

What a flagged result becomes (:func:`action_for`) depends on where it lands: an age-restricted
channel is exempt (Discord's rules allow it there); anywhere else (a channel that is not age-
restricted, a DM, a fallback channel) the server's mode applies: ``spoiler``, ``blur``,
``withhold``, or ``off`` (posted as it is). A job asked in a server follows that server's policy
wherever its result goes, its requester's DMs included. A result the classifier could not read
is withheld whatever the mode (but off): it cannot be shown blurred as "probably fine".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.safety.classifier import Scores
from bot.safety.settings import SafetySettings
from db.community_values import ServerPolicy

#: The label recorded for an image the classifier could not read.
UNREADABLE = "unclassified"
#: What delivery did with a job's result (``jobs.safety_action``).
POSTED, EXEMPT, SPOILER, BLUR, WITHHELD = "posted", "exempt", "spoiler", "blur", "withheld"


@dataclass(frozen=True)
class ImagePolicy:
    """The policy in force for one server (or for DMs)."""

    mode: str
    labels: tuple[str, ...]
    threshold: float
    reveal_in_dm: bool
    reports_to_hide: int
    strikes: int | None


@dataclass(frozen=True)
class Verdict:
    """A job's classification: flagged or not, by which label, with which score."""

    flagged: bool
    label: str | None
    score: float | None

    @property
    def unreadable(self) -> bool:
        return self.label == UNREADABLE

    def describe(self) -> str:
        """``nsfw 93%``, for members and moderators."""
        if self.unreadable:
            return "could not be checked"
        return f"{self.label} {self.score:.0%}" if self.label is not None and self.score is not None else "clean"


def policy_for(server: ServerPolicy | None, settings: SafetySettings) -> ImagePolicy:
    """A server's policy over the configured defaults (None: a job asked in a DM)."""
    server = server or ServerPolicy()
    mode = server.safety_mode or settings.mode
    return ImagePolicy(
        mode=mode if settings.enabled else "off",
        labels=tuple(label.lower() for label in (server.safety_labels or settings.labels)),
        threshold=server.safety_threshold if server.safety_threshold is not None else settings.threshold,
        reveal_in_dm=server.reveal_in_dm,
        reports_to_hide=server.reports_to_hide or settings.reports_to_hide,
        strikes=server.strikes or None,
    )


def judge(images: Sequence[Scores | None], policy: ImagePolicy) -> Verdict:
    """The job's verdict over its images' scores (None: an image the classifier could not read)."""
    if any(scores is None for scores in images):
        return Verdict(True, UNREADABLE, None)
    worst_label, worst = None, -1.0
    for scores in images:
        for label in policy.labels:
            score = scores.get(label)
            if score is not None and score > worst:
                worst_label, worst = label, score
    if worst_label is None:
        return Verdict(False, None, None)
    return Verdict(worst >= policy.threshold, worst_label, worst)


def action_for(verdict: Verdict, policy: ImagePolicy, *, age_restricted: bool) -> str:
    """What a result with ``verdict`` becomes in a place that is (or is not) age-restricted."""
    if not verdict.flagged or policy.mode == "off":
        return POSTED
    if age_restricted:
        return EXEMPT
    if verdict.unreadable:
        return WITHHELD
    return {"spoiler": SPOILER, "blur": BLUR, "withhold": WITHHELD}[policy.mode]


def may_reveal(policy: ImagePolicy, *, age_restricted: bool, requester_in_dm: bool) -> bool:
    """Whether a blurred result's original may be shown: in an age-restricted channel, or by DM
    to its requester where the server allows that."""
    return age_restricted or (requester_in_dm and policy.reveal_in_dm)
