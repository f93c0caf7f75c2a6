"""The admin API keeps the promise of its OpenAPI document: schemathesis (property-based
requests generated from the document the relay serves, and stateful sequences following its
links) against a real ``command-relay serve`` process, with every check on.

CI runs a bounded, reproducible pass (a fixed seed, no example database carried between
runs). A longer pass: ``RELAY_TEST_SCHEMATHESIS_EXAMPLES=500 RELAY_TEST_SCHEMATHESIS_SEED=…``
(docs/operations.md, Admin HTTP API).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import REPO, RedisServer
from tests.serving import Start, relay_env

TOKEN = "s" * 32
# Test cases per operation and phase; the seed fixes which ones (the same run every time).
EXAMPLES = int(os.environ.get("RELAY_TEST_SCHEMATHESIS_EXAMPLES", "10"))
SEED = int(os.environ.get("RELAY_TEST_SCHEMATHESIS_SEED", "20261202"))
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.mark.timeout(max(300, EXAMPLES * 30))
async def test_adminapi_conforms_to_its_openapi_document(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        tmp_path: Path) -> None:
    """Every generated request, valid or not, and every stateful sequence of linked calls
    gets an answer the document allows: no 5xx, documented status codes and content types,
    bodies matching their schemas, schema-valid requests accepted and schema-violating ones
    refused, 401 without the token, 405 for other methods; the suppression list's routes
    do their work on what they accept; and the relay logs no error."""
    relay = serve(relay_env(redis_server.url, tmp_path / "state", RELAY_ADMIN_TOKEN=TOKEN,
                            RELAY_ADMIN_LISTEN="127.0.0.1:0"))
    [listening] = await relay.wait_event("admin_api.listening")
    url = f"http://{listening['listen']}/v1/openapi.json"
    command = [str(SCHEMATHESIS), "run", url, "--checks", "all",
               "--header", f"Authorization: Bearer {TOKEN}",
               "--phases", "examples,coverage,fuzzing,stateful",
               "--max-examples", str(EXAMPLES), "--seed", str(SEED),
               "--generation-database", "none", "--workers", "1",
               "--request-timeout", "10", "--no-color"]
    result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                     cwd=tmp_path, timeout=max(280, EXAMPLES * 28),
                                     env={**os.environ, "NO_COLOR": "1",
                                          "SCHEMATHESIS_HOOKS": "tests.admin.schemathesis_hooks",
                                          "PYTHONPATH": str(REPO)})
    report = result.stdout[-12000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "No issues found" in result.stdout, report
    # The stateful phase ran on the document's links (POST /v1/users -> the user's routes).
    assert "Stateful" in result.stdout and "API Links" in result.stdout, report
    # The suppression routes took generated requests, not only refused them: entries were
    # added and imported, and removed through the link from POST /v1/suppressions.
    done = {r.get("event") for r in relay.records()}
    assert {"suppression.added", "suppression.imported", "suppression.removed"} <= done
    errors = [r for r in relay.records() if r.get("level") in ("error", "critical")]
    assert errors == [], errors
    assert "Traceback" not in relay.stderr
