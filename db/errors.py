"""What the queue refuses, and why. Each docstring is the default message a member sees.

:class:`StorageError` is the operator's: the database cannot be written at all (read-only file
or folder), said in one line at start-up, naming the path and what to do.
"""

from __future__ import annotations


class QueueError(Exception):
    """The job queue could not do that."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class PendingLimitExceeded(QueueError):
    """You already have too many jobs waiting. Wait for one to finish or /cancel one."""

    def __init__(self, pending: int, limit: int) -> None:
        self.pending = pending
        self.limit = limit
        super().__init__(
            f"You already have {pending} jobs waiting (limit {limit}). Wait for one to finish or /cancel one."
        )


class NotYours(QueueError):
    """Only the member who asked for this job, or a moderator, can cancel it."""


class AlreadyFinished(QueueError):
    """This job has already finished, so there is nothing to cancel."""


class JobNotFound(QueueError):
    """There is no job with that id. Check the number and try again."""


class StorageFull(QueueError):
    """The bot's storage is full, so your job was not queued; the server's owner has been told."""


class StorageError(Exception):
    """The database cannot be written; the message names it and says what to do."""
