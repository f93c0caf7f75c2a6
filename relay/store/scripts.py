"""Lua sources kept beside the code that calls them (``relay/<package>/lua/``), read with
importlib.resources so they load the same from a checkout and from an installed wheel.

A script may take prologues, shared functions put in front of it, so a rule is written
once: the quota scripts that resolve the plan in force (``reserve.lua``, ``commit.lua``,
``plan_change.lua``) get ``terms.lua``; those that give units back (``refund.lua``,
``commit.lua``) get ``units.lua``; those that read or end a message's claims for idempotent
resubmission (``claim.lua``, ``conclude.lua``, ``commit.lua``) get ``claims.lua``.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files


def lua_source(package: str, name: str, *, prologues: Sequence[str] = ()) -> str:
    """The body of ``<package>/lua/<name>``, with each of ``<package>/lua/<prologues>`` in
    front, in order."""
    folder = files(package).joinpath("lua")
    return "".join(folder.joinpath(part).read_text(encoding="utf-8")
                   for part in (*prologues, name))
