"""The container image's HEALTHCHECK: GET /healthz on the relay's metrics listener.

Slim images have no curl, so this is stdlib Python. It reads ``RELAY_METRICS_LISTEN`` (the
image sets ``0.0.0.0:9465``; the relay's default is ``127.0.0.1:9465``), turns a wildcard
address into loopback, and exits 0 when /healthz answers 200, 1 otherwise, with one line
saying why (Docker keeps it: ``docker inspect --format '{{json .State.Health}}'``). A
listener moved in a TOML settings file only is invisible here: set the variable as well.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_LISTEN = "127.0.0.1:9465"
# A listener on every interface is reached on loopback from inside the container.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def healthz_url(environ: Mapping[str, str]) -> str | None:
    """The /healthz URL for the configured listener, or None when it is disabled."""
    listen = environ.get("RELAY_METRICS_LISTEN", DEFAULT_LISTEN).strip()
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def check(environ: Mapping[str, str], timeout: float = 4.0) -> tuple[bool, str]:
    url = healthz_url(environ)
    if url is None:
        return False, ("RELAY_METRICS_LISTEN is empty, so there is no /healthz to check: "
                       "enable the listener or run the container with --no-healthcheck")
    # No proxy, whatever the environment says: the listener is on this host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def main() -> int:
    healthy, detail = check(os.environ)
    print(("healthy: " if healthy else "unhealthy: ") + detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
