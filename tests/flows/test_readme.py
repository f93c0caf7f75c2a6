"""The README's first steps, run as written: every command of the "Try it" and "Pointing an
application" sections, parsed from README.md itself, in a fresh folder on the embedded
defaults, with each ``#>`` line checked against what the command printed. The README and
what a newcomer sees cannot drift apart.

The reference lives in ``docs/``: every relative link of the README, of ``docs/*.md`` and of
the bench and deploy READMEs must reach an existing file (and heading, for an ``#anchor``),
every repository path they name in backquotes must exist, and the README's map of ``docs/``
must list every page.

The ``sh`` blocks are the path, run in order; a ``bash`` block is an alternative to the step
before it (the same message sent with Python alone, for a machine without swaks), run once
the path is done, against the same relay, and checked the same way.

The only changes made to the commands: ``./dev serve`` and ``./dev relay`` run this
checkout's ``python -m relay`` (``./dev`` would build a venv), the relay listens on an
ephemeral port instead of 2525 (tests run in parallel), and the metrics listeners are off.
"""

from __future__ import annotations

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
from tests.serving import clean_env

SECTIONS = ("## Try it: first message in a minute", "## Pointing an application at the relay")
DOCS = REPO / "docs"
# Pages whose relative links must lead somewhere real; their backquoted repository paths
# (``relay/smtp/protocol.py``) are named from the repository's root.
PAGES = (REPO / "README.md", *sorted(DOCS.glob("*.md")))
SUB_READMES = (REPO / "bench" / "README.md", REPO / "deploy" / "README.md")
_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"`((?:relay|tests|bench|deploy|policies|docs)/[^`\s]*)`")
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
    env = clean_env(metrics_ports=False)
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


def _prose(text: str) -> str:
    """A Markdown page without its fenced blocks (commands and diagrams hold no links)."""
    return _FENCE.sub("", text)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    as hyphens, a repeated heading numbered from -1."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(text: str, page: Path) -> list[str]:
    """The relative links of ``text`` (the page at ``page``) that lead nowhere: no such
    file, or no such heading."""
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z+]*:", target):
            continue  # https:, mailto:: not this repository's
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not file:
            headings = heading_anchors(text)
        elif not resolved.exists():
            broken.append(f"{target}: no file {resolved.relative_to(REPO)}")
            continue
        else:
            headings = heading_anchors(_read(resolved)) if resolved.suffix == ".md" else set()
        if anchor and anchor not in headings:
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    return broken


def missing_paths(text: str) -> list[str]:
    """Repository paths ``text`` names in backquotes that do not exist (patterns such as
    ``tests/test_deploy*.py`` or ``relay/<package>/lua/`` are not paths)."""
    return [path for path in _PATH.findall(_prose(text))
            if not re.search(r"[*<>{}…]", path) and not (REPO / path).exists()]


def test_the_checks_find_what_is_broken() -> None:
    """The link, anchor and path checks flag a bad link, a bad anchor and a bad path (a guard
    against checks that pass by finding nothing)."""
    assert {"1-connect-the-proxy-header-and-admission", "what-may-import-what"} <= \
        heading_anchors(_read(DOCS / "flow.md"))
    assert "try-it-first-message-in-a-minute" in heading_anchors(_read(REPO / "README.md"))
    assert heading_anchors("# A\n## A\n## `b`: c, d\n") == {"a", "a-1", "b-c-d"}
    probe = ("# Probe\n\n[a](flow.md#what-may-import-what) [b](gone.md)\n"
             "[c](replies.md#no-such-heading) [d](#probe) [e](#nowhere) [f](https://x.example)\n"
             "[g](../README.md#try-it-first-message-in-a-minute)\n"
             "`relay/smtp/protocol.py` `relay/server.py` `tests/test_deploy*.py`\n"
             "```\n[h](inside-a-fence.md) `relay/fenced.py`\n```\n")
    page = DOCS / "probe.md"  # resolves its links from docs/, as a page there would
    assert [b.split(":")[0] for b in broken_links(probe, page)] == [
        "gone.md", "replies.md#no-such-heading", "#nowhere"]
    assert missing_paths(probe) == ["relay/server.py"]


@pytest.mark.parametrize("page", [*PAGES, *SUB_READMES], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    """Every relative link reaches an existing file, and its #anchor an existing heading."""
    assert broken_links(_read(page), page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_repository_paths_exist(page: Path) -> None:
    """Every module, test or file the README and docs/ name exists (no flat relay/server.py
    after the move to one package per stage)."""
    assert missing_paths(_read(page)) == []


def test_readme_maps_every_doc() -> None:
    """The README's map of docs/ links every page of docs/ (the generated one included)."""
    linked = {(REPO / target.partition("#")[0]).resolve()
              for target in _LINK.findall(_prose(_read(REPO / "README.md")))
              if target.startswith("docs/")}
    pages = {p.resolve() for p in DOCS.glob("*.md")}
    assert pages - linked == set()
