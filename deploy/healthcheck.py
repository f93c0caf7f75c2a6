"""The container image's HEALTHCHECK: GET /healthz on the relay's (or the notifier's) metrics
listener.

Slim images have no curl, so this is stdlib Python. It reads ``RELAY_METRICS_LISTEN`` (the
image sets ``0.0.0.0:9465``; the relay's default is ``127.0.0.1:9465``), or the variable
named as its one argument (``healthcheck.py RELAY_NOTIFIER_METRICS_LISTEN`` for the notifier:
the image sets ``0.0.0.0:9466``), turns a wildcard address into loopback, and exits 0 when
/healthz answers 200, 1 otherwise, with one line saying why (Docker keeps it: ``docker
inspect --format '{{json .State.Health}}'``); 2 for a variable it does not know. A listener
moved in a TOML settings file only is invisible here: set the variable as well.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

# Each listener's variable and the relay's own default for it (relay/config/settings.py).
DEFAULTS = {"RELAY_METRICS_LISTEN": "127.0.0.1:9465",
            "RELAY_NOTIFIER_METRICS_LISTEN": "127.0.0.1:9466"}
VARIABLE = "RELAY_METRICS_LISTEN"
DEFAULT_LISTEN = DEFAULTS[VARIABLE]
# A listener on every interface is reached on loopback from inside the container.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def healthz_url(environ: Mapping[str, str], variable: str = VARIABLE) -> str | None:
    """The /healthz URL for the listener ``variable`` configures, or None when disabled."""
    listen = environ.get(variable, DEFAULTS[variable]).strip()
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def check(environ: Mapping[str, str], timeout: float = 4.0,
          variable: str = VARIABLE) -> tuple[bool, str]:
    url = healthz_url(environ, variable)
    if url is None:
        return False, (f"{variable} is empty, so there is no /healthz to check: "
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


def main(argv: Sequence[str] = ()) -> int:
    if len(argv) > 1 or (argv and argv[0] not in DEFAULTS):
        print(f"usage: healthcheck.py [{' | '.join(DEFAULTS)}]", file=sys.stderr)
        return 2
    healthy, detail = check(os.environ, variable=argv[0] if argv else VARIABLE)
    print(("healthy: " if healthy else "unhealthy: ") + detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
