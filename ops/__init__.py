"""Health and metrics for operators: an optional HTTP endpoint (``[ops]`` in config.toml).

``/metrics`` serves Prometheus series (queue depth, jobs, times, images, batch rows, GPU
memory, database and Discord up); ``/healthz`` answers 200 while every named check passes and
503 naming those that fail. A process builds a :class:`Metrics` and a :class:`Health` from
callables of its own and serves them with :class:`OpsServer` on its event loop.

Layering: ops imports ``db`` (to count jobs) and never ``bot`` or ``engine``, and never torch.
"""

from ops.health import Health
from ops.metrics import Metrics, gpu_memory, record_finished
from ops.queries import database_reachable, queue_counts
from ops.server import OpsServer, OpsServerError
from ops.settings import OpsConfigError, OpsSettings, parse_ops

__all__ = [
    "Health",
    "Metrics",
    "OpsConfigError",
    "OpsServer",
    "OpsServerError",
    "OpsSettings",
    "database_reachable",
    "gpu_memory",
    "parse_ops",
    "queue_counts",
    "record_finished",
]
