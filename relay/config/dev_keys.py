"""Development keys kept in the state folder, for a relay run without its production
settings (``./dev serve``): made once, readable by the owner only, each announced with a
warning naming the setting that replaces it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger()


def dev_key(configured: str | None, path: Path, make: Callable[[], bytes], *, event: str,
            setting: str) -> bytes:
    """``configured`` as bytes, or the key in ``path``, made with ``make`` the first time."""
    if configured:
        return configured.encode()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_bytes(make())
        log.warning(event, path=str(path), note=f"development default: set {setting} in "
                                                "production")
    return path.read_bytes().strip()
