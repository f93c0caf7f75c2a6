"""A pytest plugin: no secret the test run uses may appear in any log the run wrote.

The relay promises that no log line, at any level and under any failure, carries a password,
an AUTH payload, an API key, a webhook secret, the admin token, the credentials key or the
workers' TLS ticket key. This
plugin holds the whole test run to it:

* **The secrets**: the fixed ones of the suite (``STATIC_SECRETS``, a test checks the table
  against the string constants of ``tests/``), plus every secret a test hands the relay at
  run time: the secret settings of an in-process relay (``register_settings``, called by the
  ``make_relay`` fixture), the secret ``RELAY_*`` variables of every ``command-relay``
  subprocess and what such a process reads with ``--password-stdin``/``--secret-stdin``.
* **Their encodings** (``needles``): the text itself, its URL and JSON escapes, and the
  base64 runs that any base64 text containing it must contain, at each of the three
  alignments: so an AUTH PLAIN token (base64 of ``authzid NUL login NUL password``) or an
  AUTH LOGIN answer is found whatever the login before the password.
* **The logs**: everything pytest captured of each test phase (the relay's in-process
  structlog JSON lines go to stdout; aiosmtpd's ``logging`` records), every event a
  ``structlog.testing.capture_logs`` block swallowed, and the stdout/stderr of every
  ``command-relay`` subprocess (files, pipes read by ``communicate``/``subprocess.run``).
  Files are scanned, from where the last scan stopped, at the end of every test and once
  more when the session ends.

A finding fails the test it was found in (the report names the test, the source and the
line); one found only at the end of the session fails the run. Each pytest-xdist worker runs
its own copy and scans what its tests wrote.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from relay.config.declare import Declared
from relay.config.settings import SETTINGS
from relay.smtp.tickets import TICKET_KEY_VAR

# Secrets written into the suite (module, name -> value). tests/test_secretscan.py checks that
# every string constant named like a secret in tests/ is listed here.
STATIC_SECRETS: dict[str, str] = {
    "conftest.PASSWORD": "correct horse battery staple",
    "cli.test_commands.CLI_PASSWORD": "s3cret pass phrase",
    "cli.test_commands.MC_SECRET": "md-Zx81-secret-api-key",
    "webhooks.WEBHOOK_SECRET": "webhook-signing-secret-0123456789",
    "admin.test_api.TOKEN": "t" * 32,
    "store.test_urls.SECRET": "s3cr3t-Pa55",
    "config.test_settings.SECRET": "hunter2-s3cret",
    "flows.test_routes.timeline secret": "timeline-secret-0123456789abcdef",
    "flows.test_unsubscribe_headers.LINK_SECRET": "a-test-link-secret-of-32-bytes!!",
    "flows.test_lifecycle.admin_token": "a-long-admin-token-for-tests",
    "cli.test_usage.link_secret": "cli-usage-link-secret-0123456789",
    "flows.test_public_links.TOKEN": "a-public-links-admin-token-0123456789",
    "deploy.deploykit.RELAY_CREDENTIALS_KEY": "UBU5Ey1ZqhErT4YxI5fRttvpeJCMxb7C_i9MaC3W6UY=",
    "deploy.deploykit.admin token": "an-admin-token-of-some-length",
    "deploy.deploykit.notify secret": "a-notify-signing-secret",
    "deploy.deploykit.timeline secret": "a-timeline-signing-secret",
    "deploy.deploykit.upstream password": "a-password",
    "deploy.deploykit.RELAY_LINK_SECRET": "a-link-signing-secret-of-some-length",
    "admin.test_api.new user password": "a-long-password",
    "flows.test_cluster.user password": "pw-one-long-enough",
    "cli.test_commands.APP_PASSWORD": "an app secret of 30 characters",
    "cli.test_commands.RELAY_ADMIN_TOKEN": "hunter2-admin-token",
    "admin.test_api_schema.TOKEN": "s" * 32,
    "admin.test_api.password": "exactly-20-chars-pw!",
    "observe.test_logs.SECRET": "hunter2-in-a-local",
    "flows.test_security.OTHER_PASSWORD": "another user's passphrase 42",
    "fuzzinput.APP_PASSWORD": "fuzz app credential passphrase",
    "public_http.LINK_SECRET": "link-signing-secret-for-tests-0123",
    "public_http.MANDRILL_SECRET": "mandrill-webhook-key-0123456789",
    "public_http.COMMAND_SECRET": "command-webhook-secret-0123456789",
}

# The settings declared secret (relay/config/settings.py). Those masked by a mask of their
# own are URLs (redis_url, upstream_url, the route URLs): the secret is their password; of the
# others (tokens, keys) the whole value is.
SECRET_SETTINGS = tuple(d for d in SETTINGS if d.setting.secret and d.setting.mask is None)
SECRET_URL_SETTINGS = tuple(d for d in SETTINGS if d.setting.secret and d.setting.mask is not None)
MIN_SECRET = 6  # shorter values ("hunter") would match ordinary words
# A base64 run must stand for at least this many bytes of the secret: shorter runs of a
# short secret ("a-password") would match the base64 of common words ("password").
MIN_COVERED = 9


def needles(secret: str) -> set[str]:
    """The strings whose presence in a log means ``secret`` leaked: the text, its URL- and
    JSON-escaped forms, and for each alignment (0, 1, 2 bytes before it) the part of any
    base64 (standard and URL-safe) encoding that depends on the secret's bytes alone."""
    raw = secret.encode()
    found = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
             json.dumps(secret)[1:-1]}
    for offset in range(3):
        data = b"\0" * offset + raw
        whole = data[:len(data) // 3 * 3]  # the groups of three bytes
        first = 3 if offset else 0  # a group shared with the bytes before is not the secret's
        if len(whole) - first >= MIN_COVERED:
            encoded = base64.b64encode(whole)[first // 3 * 4:].decode()
            found.add(encoded)
            found.add(encoded.replace("+", "-").replace("/", "_"))
    return {n for n in found if len(n) >= MIN_SECRET}


def _secret_named_by(var: str) -> Declared | None:
    """The secret setting the variable ``var`` sets (RELAY_ROUTE_<NAME>_URL included)."""
    key = var.removeprefix("RELAY_").lower()
    for declared in (*SECRET_SETTINGS, *SECRET_URL_SETTINGS):
        family = declared.setting.family
        if var.startswith("RELAY_") and (family.match(key) if family else key == declared.key):
            return declared
    return None


@dataclass(frozen=True, slots=True)
class Finding:
    secret: str  # where the secret came from, never its value
    source: str  # "captured stdout call", a file path, "capture_logs"
    line_no: int
    line: str  # the line with the needle masked

    def __str__(self) -> str:
        return f"{self.source}:{self.line_no}: secret {self.secret!r} in: {self.line[:300]}"


class SecretScanner:
    """The registry of secrets and the scanner of texts and files."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._needles: dict[str, str] = {}  # needle -> name of the secret
        # log file -> (bytes already scanned, number of the next line)
        self._offsets: dict[Path, tuple[int, int]] = {}
        self.pending: list[Finding] = []  # found since the last report
        for name, value in STATIC_SECRETS.items():
            self.register(value, name)

    def register(self, value: str | None, name: str = "registered at run time") -> None:
        if not value or len(value) < MIN_SECRET:
            return
        with self._lock:
            for needle in needles(value):
                self._needles.setdefault(needle, name)

    def register_settings(self, settings: Any) -> None:
        """The secrets of a ``relay.config.settings.Settings`` (an in-process relay's)."""
        for declared in SECRET_SETTINGS:
            self.register(getattr(settings, declared.name), f"settings.{declared.name}")
        for declared in SECRET_URL_SETTINGS:
            value = getattr(settings, declared.name)
            # A Redis URL is text; an upstream a parsed target; the route URLs a mapping.
            for target in value.values() if isinstance(value, Mapping) else [value]:
                if isinstance(target, str):
                    self.register(urllib.parse.urlsplit(target).password,
                                  f"settings.{declared.name}")
                elif target is not None:
                    self.register(target.password, f"settings.{declared.name} password")

    def register_env(self, env: Mapping[str, str]) -> None:
        """The secrets among a subprocess's RELAY_* variables."""
        for var, value in env.items():
            if var == TICKET_KEY_VAR:  # the workers' TLS ticket key (relay/smtp/tickets.py)
                self.register(value, var)
                continue
            declared = _secret_named_by(var)
            if declared is None or not value:
                continue
            if declared in SECRET_SETTINGS:
                self.register(value, var)
                continue
            try:
                parts = urllib.parse.urlsplit(value)
                password = parts.password
            except ValueError:
                continue
            self.register(urllib.parse.unquote(password) if password else None,
                          f"{var} password")
            query = urllib.parse.parse_qs(parts.query)
            for key in ("password", "sentinel_password"):
                for item in query.get(key, []):
                    self.register(item, f"{var} {key}")

    def scan_text(self, text: str, source: str, first_line: int = 1) -> list[Finding]:
        """Every line of ``text`` holding a registered secret, in any of its encodings."""
        with self._lock:
            table = list(self._needles.items())
        found = []
        for number, line in enumerate(text.splitlines(), start=first_line):
            for needle, name in table:
                if needle in line:
                    found.append(Finding(name, source, number, line.replace(needle, "«…»")))
                    break
        return found

    def scan_file(self, path: Path) -> list[Finding]:
        """The part of ``path`` written since its last scan (whole lines only). Only the new
        bytes are read: every test's end looks at every file watched so far."""
        with self._lock:
            start, first_line = self._offsets.get(path, (0, 1))
        try:
            if path.stat().st_size <= start:
                return []
            with path.open("rb") as stream:
                stream.seek(start)
                data = stream.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        if end == 0:
            return []
        with self._lock:
            self._offsets[path] = (start + end, first_line + data.count(b"\n", 0, end))
        return self.scan_text(data[:end].decode("utf-8", "replace"), str(path), first_line)

    def watch(self, path: Path) -> None:
        with self._lock:
            self._offsets.setdefault(path, (0, 1))

    def scan_watched(self) -> list[Finding]:
        with self._lock:
            paths = list(self._offsets)
        return [finding for path in paths for finding in self.scan_file(path)]

    def report(self, findings: Iterable[Finding]) -> None:
        with self._lock:
            self.pending.extend(findings)

    def take(self) -> list[Finding]:
        with self._lock:
            taken, self.pending = self.pending, []
        return taken


SCANNER = SecretScanner()


def register(value: str | None, name: str = "registered by a test") -> None:
    """Add a secret made at run time (a generated key, say) to the scan."""
    SCANNER.register(value, name)


def register_settings(settings: Any) -> None:
    SCANNER.register_settings(settings)


# -- the subprocesses: every `command-relay` (python -m relay) the tests start -----------------
def _is_relay_command(args: Any) -> bool:
    if isinstance(args, (str, bytes)):
        return False
    parts = [str(a) for a in args]
    return any(p.endswith("command-relay") for p in parts[:1]) or any(
        a == "-m" and b == "relay" for a, b in itertools.pairwise(parts))


def _file_of(stream: Any) -> Path | None:
    name = getattr(stream, "name", None)
    return Path(name) if isinstance(name, str) else None


class ScannedPopen(subprocess.Popen):  # type: ignore[type-arg]
    """subprocess.Popen that registers a relay command's secrets and watches its output."""

    def __init__(self, args: Any, *positional: Any, **kwargs: Any) -> None:
        self._relay = _is_relay_command(args)
        if self._relay:
            env = kwargs.get("env")
            SCANNER.register_env(env if env is not None else {})
            self._reads_secret = any(str(a) in ("--password-stdin", "--secret-stdin")
                                     for a in args)
            for stream in (kwargs.get("stdout"), kwargs.get("stderr")):
                path = _file_of(stream)
                if path is not None:
                    SCANNER.watch(path)
        super().__init__(args, *positional, **kwargs)

    def communicate(self, input: Any = None, timeout: float | None = None) -> Any:
        if self._relay and input and self._reads_secret:
            text = input.decode() if isinstance(input, bytes) else str(input)
            for line in text.splitlines():
                SCANNER.register(line.strip(), "read from --password-stdin/--secret-stdin")
        out, err = super().communicate(input, timeout)
        if self._relay:
            for name, data in (("stdout", out), ("stderr", err)):
                if data:
                    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                    SCANNER.report(SCANNER.scan_text(text, f"{self.args!r} {name}"))
        return out, err


# -- structlog.testing.capture_logs: the events it swallows are scanned too ---------------------
_original_capture_call = structlog.testing.LogCapture.__call__


def _scanned_capture_call(self: Any, logger: Any, method_name: str,
                          event_dict: Any) -> Any:
    SCANNER.report(SCANNER.scan_text(repr(event_dict), "capture_logs event"))
    return _original_capture_call(self, logger, method_name, event_dict)


# -- the hooks ---------------------------------------------------------------------------------
_original_popen = subprocess.Popen


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen = ScannedPopen  # type: ignore[misc]
    structlog.testing.LogCapture.__call__ = _scanned_capture_call  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    subprocess.Popen = _original_popen  # type: ignore[misc]
    structlog.testing.LogCapture.__call__ = _original_capture_call  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    # The report carries the sections of every phase so far; scan this phase's only.
    for title, text in report.sections:
        if title.endswith(f" {call.when}"):
            SCANNER.report(SCANNER.scan_text(text, f"{title}"))
    if call.when == "setup" and not report.failed:
        return  # reported with the call
    SCANNER.report(SCANNER.scan_watched())  # subprocess logs: at the call, then teardown
    findings = SCANNER.take()
    if findings:
        report.outcome = "failed"
        listing = "\n".join(f"  {f}" for f in findings)
        report.longrepr = (f"secret scan: {len(findings)} log line(s) of {item.nodeid} "
                           f"({call.when}) carry a secret:\n{listing}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Output of long-lived processes written after their last test: scanned once more."""
    findings = [*SCANNER.take(), *SCANNER.scan_watched()]
    if findings:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        listing = "\n".join(f"  {f}" for f in findings)
        message = f"secret scan: {len(findings)} log line(s) carry a secret:\n{listing}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
