"""``serve`` and ``notifier``: run the relay or the notifier until a signal says stop.

Signals in ``serve``: SIGTERM (and SIGINT) drain the relay (``RelayApp.stop``, see
``relay/smtp/shutdown.py``), SIGHUP reloads ``policies/`` (``RelayApp.reload_policies``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from typing import TYPE_CHECKING

import aiohttp
import structlog

from relay.config.policies import load_policies
from relay.config.settings import Settings
from relay.errors import StartupError
from relay.events.channels import Channel, EmailChannel, WebhookChannel
from relay.events.notifier import GROUP, Notifier
from relay.observe.health import MetricsServer, NotifierReadiness
from relay.observe.metrics import NotifierMetrics
from relay.process.redis import redis_for, wait_for_redis
from relay.process.wiring import RelayApp, make_upstream

if TYPE_CHECKING:
    from relay.process.link import WorkerLink

log = structlog.get_logger()


async def serve(settings: Settings, worker: WorkerLink | None = None) -> None:
    """Run until SIGINT or SIGTERM, then drain for up to ``drain_timeout`` seconds; SIGHUP
    reloads the policies. ``worker``: this process is one of several
    (``relay/process/supervisor.py``)."""
    # Signal handlers first: a SIGTERM during start-up (waiting for Redis, say) must still
    # stop the embedded Redis cleanly instead of killing the process around it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    app: RelayApp | None = None
    reloads: set[asyncio.Task[bool]] = set()

    def on_stop(name: str) -> None:
        if stopping.is_set():
            log.info("relay.signal_ignored", signal=name, note="already draining")
            return
        log.info("relay.signal", signal=name, drain_timeout=settings.drain_timeout)
        stopping.set()

    def on_reload() -> None:
        if app is None or app.draining:
            # Before start-up the policies are about to be read anyway; while draining,
            # no new transaction would use them.
            log.info("policies.reload_skipped", reason="draining" if app else "starting")
            return
        task = loop.create_task(app.reload_policies())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    async with redis_for(settings) as redis:
        await wait_for_redis(redis, 10)
        app = RelayApp(settings, redis, sockets=worker.sockets if worker else None)
        await app.start()
        # Everything allocated so far (modules, policies, pools) lives as long as the
        # process: moved out of the collector's view, full collections stay short and do
        # not show up as latency spikes on the SMTP path.
        gc.freeze()
        if worker is not None:
            worker.started(on_parent_gone=stopping.set)
        try:
            await stopping.wait()
        finally:
            log.info("relay.stopping")
            await app.stop(settings.drain_timeout)
            for task in list(reloads):
                with contextlib.suppress(Exception):
                    await task


async def run_notifier(settings: Settings) -> None:
    """``command-relay notifier``: deliver events until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    policies = load_policies(settings.policies_dir)
    policy = policies.notifications
    async with redis_for(settings) as redis, aiohttp.ClientSession() as http:
        await wait_for_redis(redis, 10)
        upstream = make_upstream(settings)
        channels: dict[str, Channel] = {}
        if policy.in_app.enabled:
            if settings.notify_webhook_url and settings.notify_webhook_secret:
                channels["in_app"] = WebhookChannel(
                    settings.notify_webhook_url, settings.notify_webhook_secret,
                    timeout=policy.in_app_timeout, session=http)
            else:
                log.warning("notify.in_app_unconfigured",
                            note="set RELAY_NOTIFY_WEBHOOK_URL and RELAY_NOTIFY_WEBHOOK_SECRET; "
                                 "in-app notifications are skipped meanwhile")
        if policy.timeline.enabled:
            if settings.timeline_webhook_url and settings.timeline_webhook_secret:
                channels["timeline"] = WebhookChannel(
                    settings.timeline_webhook_url, settings.timeline_webhook_secret,
                    timeout=policy.timeline_timeout, session=http, name="timeline")
            else:
                log.warning("notify.timeline_unconfigured",
                            note="set RELAY_TIMELINE_WEBHOOK_URL and "
                                 "RELAY_TIMELINE_WEBHOOK_SECRET; Contact Timeline entries are "
                                 "skipped meanwhile")
        if policy.email.enabled:
            channels["email"] = EmailChannel(upstream, sender=policy.email_from,
                                             hostname=settings.hostname)
        metrics = NotifierMetrics(channels)
        server: MetricsServer | None = None
        if settings.notifier_metrics_listen is not None:
            server = MetricsServer(settings.notifier_metrics_listen, metrics.registry,
                                   NotifierReadiness(redis=redis, timeout=settings.redis_timeout,
                                                     stopping=stop.is_set, metrics=metrics,
                                                     group=GROUP))
            try:
                await server.start()
            except OSError as exc:
                await upstream.close()
                raise StartupError(f"cannot listen for metrics (notifier_metrics_listen): "
                                   f"{exc.strerror or exc}") from None
        try:
            await Notifier(redis, channels, policy, metrics=metrics).run(stop)
        finally:
            await upstream.close()
            if server is not None:
                await server.stop()

