"""Lua sources kept beside the code that calls them (``relay/<package>/lua/``), read with
importlib.resources so they load the same from a checkout and from an installed wheel.

A script may take a prologue: the quota scripts that resolve the plan in force
(``reserve.lua``, ``commit.lua``, ``plan_change.lua``) get ``terms.lua`` in front, so the
rule for a pending plan change is written once.
"""

from __future__ import annotations

from importlib.resources import files


def lua_source(package: str, name: str, *, prologue: str | None = None) -> str:
    """The body of ``<package>/lua/<name>``, with ``<package>/lua/<prologue>`` in front."""
    folder = files(package).joinpath("lua")
    body = folder.joinpath(name).read_text(encoding="utf-8")
    if prologue is not None:
        return folder.joinpath(prologue).read_text(encoding="utf-8") + body
    return body
