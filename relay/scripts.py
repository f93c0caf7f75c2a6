"""Lua sources from ``relay/lua/``, read with importlib.resources (STYLE §6).

Scripts that resolve the plan in force (``reserve.lua``, ``commit.lua``,
``plan_change.lua``) get the shared
prologue ``terms.lua`` prepended, so the rule for a pending plan change is written once.
"""

from __future__ import annotations

from importlib.resources import files

_WITH_TERMS = {"reserve.lua", "commit.lua", "plan_change.lua"}


def lua_source(name: str) -> str:
    """The body of ``relay/lua/<name>``, with terms.lua in front where it is needed."""
    body = files("relay").joinpath("lua", name).read_text(encoding="utf-8")
    if name in _WITH_TERMS:
        return files("relay").joinpath("lua", "terms.lua").read_text(encoding="utf-8") + body
    return body
