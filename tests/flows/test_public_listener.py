"""The public HTTP listener in ``command-relay serve --workers 2``, as real processes: the
supervisor binds it once, every worker serves it, and a one-click unsubscribe and a Command
webhook delivery sent to it land in Redis."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis

from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.identity.signed_links import LinkSigner
from tests.conftest import RedisServer
from tests.public_http import COMMAND_SECRET, LINK_SECRET, public_client
from tests.serving import Start, no_traceback, relay_env


async def test_public_listener_is_shared_by_the_workers(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        tmp_path: Path) -> None:
    """--workers 2: the supervisor binds public_listen (port 0 here) once, both workers
    serve it (public.listening, shared), an unsubscribe POST and a signed Command delivery
    create their entries, and SIGTERM stops everything with status 0."""
    relay = serve(relay_env(redis_server.url, tmp_path / "state",
                            RELAY_LINK_SECRET=LINK_SECRET,
                            RELAY_COMMAND_WEBHOOK_SECRET=COMMAND_SECRET), "--workers", "2")
    [started] = await relay.wait_event("supervisor.started")
    port = int(started["listen"]["public_listen"].rpartition(":")[2])
    listening = await relay.wait_event("public.listening", count=2)
    assert sorted(r["worker"] for r in listening) == [1, 2]
    assert all(r["shared"] and r["listen"].endswith(f":{port}") for r in listening)
    await relay.wait_event("worker.ready", count=2)

    link = LinkSigner(LINK_SECRET.encode()).sign("unsubscribe",
                                                 {"u": "u-agent", "r": "bye@example.test"})
    body = json.dumps({"events": [{"id": "w1", "type": "complaint",
                                   "recipient": "angry@example.test",
                                   "timestamp": int(time.time())}]}).encode()
    t = int(time.time())
    async with public_client(port) as client:
        unsubscribed = await client.request("POST", f"/unsubscribe/{link}",
                                            data={"List-Unsubscribe": "One-Click"})
        delivered = await client.command(body, t)
    assert (unsubscribed.status, delivered.status) == (200, 200)
    store = SuppressionStore(redis_client)
    entry = await store.get("bye@example.test", user_id="u-agent")
    assert entry is not None and entry.reason is SuppressionReason.UNSUBSCRIBE
    complaint = await store.get("angry@example.test", user_id=None)
    assert complaint is not None and complaint.source == "command"

    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    no_traceback(relay)
