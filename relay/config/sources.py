"""One parsed policy file, with enough of its text to point at the line of a bad key.

Policy errors name the file, the line and the key (STYLE §5): ``plans.toml:31:
plans.free.monthly_limit: must be greater than 0``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class PolicyError(ValueError):
    """A policy file is unreadable or invalid; the message names file, line and key."""


def _check_type(value: Any, kind: type) -> Any:
    """``value`` if it is a ``kind`` (a whole number is a fine float; a bool is no int)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


class TomlSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    def _key_line(self, start: int, key: str | None) -> int:
        if key is None:
            return start + 1
        lines = self.text.splitlines()
        key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start + 1, len(lines)):
            if lines[i].lstrip().startswith("["):
                break
            if key_re.match(lines[i]):
                return i + 1
        return start + 1

    def line_of(self, table: str, key: str | None = None) -> int | None:
        """Best-effort line number of ``[table]`` or of ``key`` inside it (1-based)."""
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        lines = self.text.splitlines()
        start = next((i for i, line in enumerate(lines) if header.match(line)), None)
        return None if start is None else self._key_line(start, key)

    def error(self, table: str, key: str | None, reason: str) -> PolicyError:
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = f"{table}.{key}" if key else table
        return PolicyError(f"{where}: {name}: {reason}")

    def table(self, data: Mapping[str, Any], table: str,
              keys: Mapping[str, type]) -> dict[str, Any]:
        """Check ``data`` has exactly ``keys`` with the given types; returns it as a dict."""
        for key in data:
            if key not in keys:
                raise self.error(table, key, "unknown key")
        out: dict[str, Any] = {}
        for key, kind in keys.items():
            if key not in data:
                raise self.error(table, None, f"missing key {key!r}")
            try:
                out[key] = _check_type(data[key], kind)
            except TypeError as exc:
                raise self.error(table, key, str(exc)) from None
        return out

    def nth(self, array: str, index: int) -> TomlItem:
        """The ``index``-th ``[[array]]`` table, for errors that point at its lines."""
        header = re.compile(rf"^\s*\[\[\s*{re.escape(array)}\s*\]\]")
        starts = [i for i, line in enumerate(self.text.splitlines()) if header.match(line)]
        return TomlItem(self, f"{array}[{index}]", starts[index] if index < len(starts) else None)


class TomlItem:
    """One table of an array of tables (``[[rules]]``)."""

    def __init__(self, source: TomlSource, name: str, start: int | None) -> None:
        self._source = source
        self._name = name
        self._start = start

    def error(self, key: str | None, reason: str) -> PolicyError:
        path = self._source.path
        where = f"{path}:{self._source._key_line(self._start, key)}" \
            if self._start is not None else str(path)
        return PolicyError(f"{where}: {self._name}{'.' + key if key else ''}: {reason}")

    def fields(self, data: Mapping[str, Any], *, required: Mapping[str, type],
               optional: Mapping[str, type]) -> dict[str, Any]:
        for key in data:
            if key not in required and key not in optional:
                raise self.error(key, "unknown key")
        out: dict[str, Any] = {}
        for key, kind in {**required, **optional}.items():
            if key not in data:
                if key in required:
                    raise self.error(None, f"missing key {key!r}")
                continue
            try:
                out[key] = _check_type(data[key], kind)
            except TypeError as exc:
                raise self.error(key, str(exc)) from None
        return out
