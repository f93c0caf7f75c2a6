"""The one failure that is not an SMTP reply: the relay cannot start (a socket it cannot
bind, a certificate it cannot load, Redis not reachable in time). The command line prints
its message and exits, without a traceback."""

from __future__ import annotations


class StartupError(RuntimeError):
    pass
