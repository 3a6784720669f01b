"""The operators' HTTP endpoint: ``GET /metrics`` for Prometheus, ``GET /healthz`` for probes.

An aiohttp server on the process's own event loop (the bot's, or the worker's). What the
handlers ask (the metrics' collectors, the health checks) may block on the database, so it
runs on two threads of the endpoint's own, never on the event loop and never in asyncio's
shared pool, where the bot's work waits; an answer that takes longer than ``ANSWER_TIMEOUT``
is a 503, so a hung database makes the probe fail instead of hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ops.health import Health
from ops.metrics import Metrics
from ops.settings import OpsSettings

log = logging.getLogger("ops")
T = TypeVar("T")

#: Seconds a scrape or a probe may take before it is answered 503 (Prometheus waits 10 s).
ANSWER_TIMEOUT = 8.0


class OpsServerError(RuntimeError):
    """The endpoint cannot listen where ``[ops]`` says; the message says what to change."""


class OpsServer:
    """Serves ``metrics`` and ``health`` on ``settings.host``:``settings.port`` once started.

    Start and stop it on the running loop (``await server.start()`` / ``await server.stop()``,
    or ``async with server:``). ``settings.enabled`` is the caller's to look at: this class
    always listens when started. ``port`` is the port bound (the system's pick for port 0).
    """

    def __init__(self, settings: OpsSettings, *, metrics: Metrics | None = None, health: Health | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = health if health is not None else Health()
        self._runner: web.AppRunner | None = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; raise OpsServerError (one line) when the address is taken or not ours."""
        if self._runner is not None:
            raise RuntimeError("OpsServer.start: already serving on " + self.url)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None)  # a line per scrape would drown the bot's log
        await runner.setup()
        host, port = self.settings.host, self.settings.port
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise OpsServerError(
                f"ops: cannot listen on {host}:{port} ({e.strerror or e}); "
                "set ops.host/ops.port to a free address of this machine, "
                "or ops.enabled = false"
            ) from e
        self._runner = runner
        self._threads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sdbot-ops")
        self.port = runner.addresses[0][1]
        log.info("ops: serving /metrics and /healthz on %s", self.url)

    async def stop(self) -> None:
        """Stop listening (a no-op when not started)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    # -- handlers ---------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        # Prometheus asks for OpenMetrics in Accept; anything else gets the classic text format.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        try:
            body = await self._off_loop(encode, self.metrics.registry)
        except TimeoutError:
            return web.Response(status=503, text=f"metrics did not answer within {ANSWER_TIMEOUT:g} s\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            ok, checks = await self._off_loop(self.health.report)
        except TimeoutError:
            ok, checks = False, {}
            failed = [f"checks did not answer within {ANSWER_TIMEOUT:g} s"]
        else:
            failed = [name for name, passed in checks.items() if not passed]
        return web.json_response({"ok": ok, "checks": checks, "failed": failed}, status=200 if ok else 503)

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._threads, work, *args), ANSWER_TIMEOUT)
