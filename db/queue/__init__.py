"""The job queue (see :mod:`db.queue.core`); the names callers import, from one place."""

from db.errors import AlreadyFinished, JobNotFound, NotYours, PendingLimitExceeded, QueueError, StorageFull
from db.queue.core import Queue
from db.queue.order import fair_order
from db.queue.wakeup import NOTIFY_CHANNEL, woken_within

__all__ = [
    "NOTIFY_CHANNEL",
    "AlreadyFinished",
    "JobNotFound",
    "NotYours",
    "PendingLimitExceeded",
    "Queue",
    "QueueError",
    "StorageFull",
    "fair_order",
    "woken_within",
]
