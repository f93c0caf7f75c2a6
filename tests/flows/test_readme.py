"""The README's first steps, run as written: every command of the "Try it" and "Pointing an
application" sections, parsed from README.md itself, in a fresh folder on the embedded
defaults, with each ``#>`` line checked against what the command printed. The README and
what a newcomer sees cannot drift apart.

The ``sh`` blocks are the path, run in order; a ``bash`` block is an alternative to the step
before it (the same message sent with Python alone, for a machine without swaks), run once
the path is done, against the same relay, and checked the same way.

The only changes made to the commands: ``./dev serve`` and ``./dev relay`` run this
checkout's ``python -m relay`` (``./dev`` would build a venv), the relay listens on an
ephemeral port instead of 2525 (tests run in parallel), and the metrics listeners are off.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import POLICIES, REPO, free_port, swaks_path

SECTIONS = ("## Try it: first message in a minute", "## Pointing an application at the relay")
# Tokens that name the moment of the run; any such token stands for any other of its kind:
# the capture file's stamp, an ISO 8601 time, a month.
_TIME = re.compile(r"\d{8}T\d{6}|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?\+00:00|"
                   r"\d{4}-\d{2}")


@dataclass
class Step:
    command: str
    comment: str  # the comment at the end of the command's line (prose)
    expected: list[str] = field(default_factory=list)  # its "#>" lines

    @property
    def background(self) -> bool:
        """Commands the README runs in a terminal of their own (serve, notifier, tail -f)."""
        return bool(re.match(r"terminal \d", self.comment))


def readme_steps(language: str = "sh") -> list[Step]:
    """The commands of the sections' ``language`` blocks: ``sh`` for the path, ``bash``
    for the alternatives."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    steps: list[Step] = []
    for heading in SECTIONS:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        section = text[start:end]
        for block in re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL):
            steps.extend(_parse(block))
    return steps


def _parse(block: str) -> list[Step]:
    steps: list[Step] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if stripped.startswith("#>"):
            steps[-1].expected.append(stripped[2:].strip())
            continue
        if not stripped or stripped.startswith("#"):
            continue  # prose
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command, _, comment = (pending + line).partition("  #")
        pending = ""
        steps.append(Step(" ".join(command.split()), comment.strip().lstrip("# ")))
    return steps


def _pattern(expected: str) -> re.Pattern[str]:
    """A ``#>`` line as a pattern: ``…`` matches anything, times match any time, runs of
    spaces match any run of spaces."""
    parts = []
    for piece in re.split(r"(…|\s+)", expected):
        if piece == "…":
            parts.append(".*?")
        elif piece.isspace():
            parts.append(r"\s+")
        elif piece:
            last = 0
            for token in _TIME.finditer(piece):
                parts.append(re.escape(piece[last:token.start()]))
                parts.append(re.sub(r"\d", r"\\d", re.escape(token.group())))
                last = token.end()
            parts.append(re.escape(piece[last:]))
    return re.compile("".join(parts))


def _matched(expected: list[str], output: str) -> bool:
    """Every expected line matches a line of ``output``, in order."""
    lines = iter(output.splitlines())
    return all(any(_pattern(line).fullmatch(got.strip()) for got in lines)
               for line in expected)


def test_readme_steps_are_parsed_from_the_readme() -> None:
    """The parser finds the commands the sections show (a guard against a parser that
    silently finds nothing and so checks nothing)."""
    steps = readme_steps()
    commands = [s.command for s in steps]
    assert commands[0] == "./dev serve" and steps[0].background
    assert any(c.startswith("swaks --server 127.0.0.1:2525 --tls --auth PLAIN") for c in commands)
    assert "./dev relay usage agent@kw.example" in commands
    assert sum(s.background for s in steps) == 3
    assert sum(len(s.expected) for s in steps) >= 10
    alternatives = readme_steps("bash")
    assert [s.command.split()[0] for s in alternatives] == ["python3"]
    assert alternatives[0].expected and '"127.0.0.1", 2525' in alternatives[0].command
    assert _matched(["used 1 of 5,000 (0.0%), 4,999 remaining"],
                    "  2026-12 (UTC): used 1 of 5,000 (0.0%), 4,999 remaining") is False
    assert _matched(["2026-11 (UTC): used 1 of 5,000 (0.0%), 4,999 remaining"],
                    "  2026-12 (UTC): used 1 of 5,000 (0.0%), 4,999 remaining")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh folder like a clone's: ``policies/`` and nothing else (short, for the Unix
    socket of the embedded Redis)."""
    directory = Path(tempfile.mkdtemp(prefix="cr-readme-", dir="/tmp")).resolve()
    (directory / "policies").symlink_to(POLICIES)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.swaks
@pytest.mark.timeout(240)
def test_readme_try_it_runs_as_written(workdir: Path) -> None:
    """Each command of "Try it" and "Pointing an application" succeeds in a fresh folder on
    the embedded defaults and prints what its #> lines say; the terminals' commands keep
    running until stopped (serve and notifier with SIGTERM, exit 0; tail -f with Ctrl-C,
    130)."""
    if swaks_path() is None:
        pytest.skip("swaks is not installed (.ci/run installs it)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_LISTEN=f"127.0.0.1:{port}", RELAY_METRICS_LISTEN="",
               RELAY_NOTIFIER_METRICS_LISTEN="")
    relay = f"{shlex.quote(sys.executable)} -m relay"
    running: list[tuple[Step, subprocess.Popen[bytes], Path]] = []
    try:
        for number, step in enumerate(readme_steps()):
            command = _as_run(step.command, relay, port)
            if step.background:
                out = workdir / f"step{number}.out"
                with out.open("wb") as sink:
                    process = subprocess.Popen(["bash", "-c", f"exec {command}"], env=env,
                                               cwd=workdir, stdin=subprocess.DEVNULL,
                                               stdout=sink, stderr=subprocess.STDOUT)
                running.append((step, process, out))
                _wait_started(step, process, out, port)
                continue
            _run_and_check(step, command, env, workdir)
        for step in readme_steps("bash"):
            _run_and_check(step, _as_run(step.command, relay, port), env, workdir)
        for step, process, out in reversed(running):
            assert process.poll() is None, (step.command, out.read_text())
            stop = signal.SIGINT if "tail -f" in step.command else signal.SIGTERM
            process.send_signal(stop)
            assert process.wait(40) == (130 if stop == signal.SIGINT else 0), \
                (step.command, out.read_text())
            assert "Traceback" not in out.read_text()
    finally:
        for _, process, _ in running:
            if process.poll() is None:
                process.kill()
                process.wait()


def _as_run(command: str, relay: str, port: int) -> str:
    return (command.replace("./dev serve", f"{relay} serve")
            .replace("./dev relay", relay)
            .replace("127.0.0.1:2525", f"127.0.0.1:{port}")
            .replace('"127.0.0.1", 2525', f'"127.0.0.1", {port}'))


def _run_and_check(step: Step, command: str, env: dict[str, str], workdir: Path) -> None:
    result = subprocess.run(["bash", "-c", command], env=env, cwd=workdir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (step.command, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert _matched(step.expected, result.stdout), (step.command, step.expected, result.stdout)


def _wait_started(step: Step, process: subprocess.Popen[bytes], out: Path, port: int,
                  seconds: float = 60) -> None:
    """Until a background command is up: serve listens, the notifier said it started, and
    whatever else shows its #> lines."""
    deadline = time.monotonic() + seconds
    while True:
        text = out.read_text(encoding="utf-8", errors="replace")
        if " serve" in step.command:
            up = _listening(port)
        elif "notifier" in step.command:
            up = "notifier.started" in text
        else:
            up = bool(step.expected) and _matched(step.expected, text)
        if up:
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{step.command}: not started (exit {process.poll()}):\n"
                                 f"{text}\nexpected: {step.expected}")
        time.sleep(0.1)
