"""One source of SMTP replies: no reply text and no reply code is written outside
``relay/errors/``, and every refusal class lives there.

The scan reads the source of relay/ with ``ast`` (so comments and prose in docstrings never
count) and reports, outside ``relay/errors/``:

- a string (or bytes) constant that starts like a reply: three digits of class 2, 4 or 5,
  then a space or a dash ("550 5.7.1 …", "250-SIZE");
- an int from 200 to 599 given as ``smtp_code=`` or ``code=``, assigned to ``code`` or
  ``smtp_code`` (a class attribute carrying a reply code), compared with something named
  ``code``, or passed positionally to a reply class (a RelayError or OverLimitReply).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import relay
from relay import errors
from relay.errors import RelayError

RELAY = Path(relay.__file__).resolve().parent
ERRORS = RELAY / "errors"
REPLY_TEXT = re.compile(r"^[245]\d\d[ -]")
CODE_NAMES = {"code", "smtp_code"}
# The classes whose constructor takes a reply code: every refusal class, and the over-limit
# reply of plans.toml.
REPLY_CLASSES = {name for name, obj in vars(errors).items()
                 if isinstance(obj, type) and issubclass(obj, RelayError)} | {"OverLimitReply"}


def is_reply_code(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Constant) and type(node.value) is int
            and 200 <= node.value <= 599)


def named(node: ast.AST) -> str | None:
    """The name a node ends with: ``x`` for ``x`` and ``a.b.x`` (else None)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def reply_literals(source: str) -> Iterator[tuple[int, str]]:
    """(line, what) for each reply literal in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            text = (node.value.decode("latin-1") if isinstance(node.value, bytes)
                    else node.value)
            if REPLY_TEXT.match(text):
                yield node.lineno, f"reply text {text[:40]!r}"
        elif isinstance(node, ast.keyword):
            if node.arg in CODE_NAMES and is_reply_code(node.value):
                yield node.lineno, f"{node.arg}={ast.unparse(node.value)}"
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if is_reply_code(node.value) and any(named(t) in CODE_NAMES for t in targets):
                yield node.lineno, f"{ast.unparse(targets[0])} = {ast.unparse(node.value)}"
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if (any(named(side) in CODE_NAMES for side in sides)
                    and any(is_reply_code(side) for side in sides)):
                yield node.lineno, f"comparison {ast.unparse(node)}"
        elif isinstance(node, ast.Call) and named(node.func) in REPLY_CLASSES:
            for arg in node.args:
                if is_reply_code(arg):
                    yield node.lineno, f"{ast.unparse(node.func)}({ast.unparse(arg)}, …)"


def relay_sources() -> list[Path]:
    return sorted(path for path in RELAY.rglob("*.py") if ERRORS not in path.parents)


def test_scan_finds_the_relay_sources() -> None:
    """The scan reads the stages (guards against an empty loop) and leaves out errors/."""
    names = {path.relative_to(RELAY).as_posix() for path in relay_sources()}
    assert {"smtp/protocol.py", "smtp/hooks.py", "smtp/data.py", "smtp/transaction.py",
            "delivery/upstream.py", "delivery/routes.py", "delivery/data.py"} <= names
    assert not any(name.startswith("errors/") for name in names)


def test_no_reply_literal_outside_errors() -> None:
    """Every reply text and code outside relay/errors/ is a name imported from there."""
    found = [f"{path.relative_to(RELAY.parent)}:{line}: {what}"
             for path in relay_sources()
             for line, what in reply_literals(path.read_text(encoding="utf-8"))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(("source", "what"), [
    ('await self.push("503 Error: need RCPT")', "reply text '503 Error: need RCPT'"),
    ('EHLO = b"250-SIZE 1000"', "reply text '250-SIZE 1000'"),
    ('x = f"451 4.3.0 {detail}"', "reply text '451 4.3.0 '"),
    ('log.warning("auth.failed", smtp_code=535)', "smtp_code=535"),
    ("raise UpstreamTemporaryError(code=421)", "code=421"),
    ("class Refusal:\n    code = 550", "code = 550"),
    ("if response.code != 250: pass", "comparison response.code != 250"),
    ('reply = OverLimitReply(550, "5.7.1", text)', "OverLimitReply(550, …)"),
    ('errors.RouteRefusedError(554, "no")', "errors.RouteRefusedError(554, …)"),
])
def test_scan_reports_each_kind_of_literal(source: str, what: str) -> None:
    """Each kind of literal the scan looks for is reported (the scan can fail)."""
    assert [found for _, found in reply_literals(source)] == [what]


@pytest.mark.parametrize("source", [
    '"""A docstring that names 250 and 451 4.3.0 in its prose."""',
    "# 550 5.7.1 in a comment\nx = 1",
    "MAX_USER_POOLS = 200",
    'web.json_response(body, status=503)',
    "if 400 <= status < 500: pass",
    'text = "Upstream protocol error (reply 250)"',
])
def test_scan_ignores_what_is_not_a_reply(source: str) -> None:
    """Prose, comments, HTTP statuses and other numbers are not replies."""
    assert list(reply_literals(source)) == []


def all_subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *all_subclasses(sub)}
    return found


def test_every_refusal_class_lives_in_errors() -> None:
    """Every RelayError subclass in the relay, once each module is imported, is defined in
    relay.errors and exported by it."""
    for module in pkgutil.walk_packages(relay.__path__, "relay."):
        if module.name != "relay.__main__":  # runs the command line
            importlib.import_module(module.name)
    outside = sorted(f"{cls.__module__}.{cls.__qualname__}"
                     for cls in all_subclasses(RelayError)
                     if not cls.__module__.startswith("relay.errors")
                     and not cls.__module__.startswith("tests."))
    assert outside == []
    missing = sorted(cls.__name__ for cls in all_subclasses(RelayError)
                     if cls.__module__.startswith("relay.errors")
                     and getattr(errors, cls.__name__, None) is not cls)
    assert missing == []
