"""The image check of results and uploads, between the classifier and what delivery and
admission do.

* :meth:`ResultChecks.classify`: delivery hands it each cycle's finished jobs; their images
  are classified together (one call, in batches), each job judged by its server's policy, and
  the verdicts stored on the jobs before anything is posted.
* :meth:`ResultChecks.action`: what a job's result becomes in one place (posted, exempt,
  spoiler, blur, withheld), from the stored verdict, the server's mode, whether the place is
  age-restricted and what members and moderators decided since (a result hidden by reports
  stays blurred everywhere until a moderator restores it).
* :meth:`ResultChecks.record`: what delivery did, on the job, in the audit log and /metrics;
  with strikes on, a member whose results were withheld that many times is barred.
* :meth:`ResultChecks.check_upload`: an init image or mask flagged outside an age-restricted
  channel is refused, in one line, before any job is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from bot.inputs import BadInput
from bot.safety.classifier import SafetyCheck
from bot.safety.policy import (
    EXEMPT,
    POSTED,
    WITHHELD,
    ImagePolicy,
    Verdict,
    action_for,
    judge,
    policy_for,
)
from bot.safety.settings import SafetySettings
from db.community import Community, ServerPolicy
from db.models import Job, JobStatus
from db.queue import Queue
from db.safety import IMAGE_CHECK, SafetyRecords

log = logging.getLogger(__name__)


class ResultChecks:
    """See the module docstring. ``check`` None: no classifier configured; every verdict is
    "not checked" and every result is posted as it is."""

    def __init__(
        self,
        check: SafetyCheck | None,
        settings: SafetySettings,
        queue: Queue,
        community: Community,
        records: SafetyRecords,
        *,
        on_action: Callable[[str], None] | None = None,
    ) -> None:
        self.check, self.settings = check, settings
        self.queue, self.community, self.records = queue, community, records
        self._on_action = on_action

    async def policy(self, guild_id: int | None) -> ImagePolicy:
        server = None if guild_id is None else await asyncio.to_thread(self.community.server_policy, guild_id)
        return policy_for(server, self.settings)

    def policy_of(self, server: ServerPolicy | None) -> ImagePolicy:
        return policy_for(server, self.settings)

    # -- results ---------------------------------------------------------------------------------

    async def classify(self, jobs: Sequence[Job]) -> None:
        """Classify the done jobs among ``jobs`` that have no verdict yet, all images in one call;
        store the verdicts and set them on the ``Job`` objects."""
        todo = [job for job in jobs if job.status is JobStatus.done and job.safety_flagged is None]
        if self.check is None or not todo:
            return
        images = [await asyncio.to_thread(self.queue.images, job.id) for job in todo]
        scores = await self.check.scores([image.png for job_images in images for image in job_images])
        verdicts, at = [], 0
        for job, job_images in zip(todo, images, strict=True):
            verdict = judge(scores[at : at + len(job_images)], await self.policy(job.guild_id))
            at += len(job_images)
            if verdict.unreadable:
                log.warning("job %s: the image check could not read its images; they are withheld", job.id)
            job.safety_flagged, job.safety_label, job.safety_score = verdict.flagged, verdict.label, verdict.score
            verdicts.append((job.id, verdict.flagged, verdict.label, verdict.score))
        await asyncio.to_thread(self.records.record_verdicts, verdicts)

    async def action(self, job: Job, *, age_restricted: bool) -> str:
        """What the job's result becomes in a place that is (or is not) age-restricted."""
        if job.status is not JobStatus.done or job.safety_review == "restored":
            return POSTED
        if job.safety_review == "deleted":
            return WITHHELD
        if job.safety_review == "reported":
            return "blur"  # hidden by members' reports until a moderator decides, wherever it is
        if job.safety_flagged is None:
            return POSTED  # not checked: made before the check existed, or no classifier
        verdict = Verdict(job.safety_flagged, job.safety_label, job.safety_score)
        return action_for(verdict, await self.policy(job.guild_id), age_restricted=age_restricted)

    async def record(self, job: Job, action: str) -> str:
        """Record what delivery did with the job's result (once); a note for its status message
        when strikes warned or barred the requester."""
        if job.status is not JobStatus.done or job.safety_flagged is None or job.safety_action is not None:
            return ""
        withheld = await asyncio.to_thread(self.records.record_action, job, action)
        job.safety_action = action
        if self._on_action is not None:
            self._on_action(action)
        if action != WITHHELD or job.guild_id is None:
            return ""
        policy = await self.policy(job.guild_id)
        if policy.strikes is None:
            return ""
        if withheld >= policy.strikes:
            await asyncio.to_thread(self.community.bar, job.guild_id, job.requester_id, IMAGE_CHECK)
            return f"<@{job.requester_id}> is barred after {withheld} withheld results"
        return f"strike {withheld} of {policy.strikes}: at {policy.strikes} withheld results the member is barred"

    # -- uploads ---------------------------------------------------------------------------------

    async def check_upload(self, pngs: Sequence[bytes], server: ServerPolicy | None, *, age_restricted: bool) -> None:
        """Refuse, with BadInput, an upload the server's policy would not show here."""
        if self.check is None:
            return
        policy = self.policy_of(server)
        if policy.mode == "off":
            return
        verdict = judge(await self.check.scores(pngs), policy)
        if action_for(verdict, policy, age_restricted=age_restricted) in (POSTED, EXEMPT):
            return
        if verdict.unreadable:
            raise BadInput("Your image could not be checked by this server's image filter; try another image.")
        raise BadInput(
            f"Your image was flagged by this server's image filter ({verdict.describe()}); "
            "use it in an age-restricted channel."
        )
