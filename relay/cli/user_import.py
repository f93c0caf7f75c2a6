"""How ``command-relay users import FILE`` shows an import to a person: the file read in
chunks, a progress bar (rate, ETA) on standard error when it is a terminal, a line for each
refused line (and, with ``--changes``, each user created or updated) as the import goes,
then the summary. The import itself is ``relay.admin.user_import``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from relay.admin.import_rows import CSV, JSON_LINES, format_of
from relay.admin.import_summary import CREATED, REFUSED, UPDATED, ImportSummary, LineResult
from relay.admin.operations import Admin
from relay.admin.user_import import UserImport

READ_SIZE = 1024 * 1024
_SUFFIXES = {".csv": CSV, ".jsonl": JSON_LINES, ".ndjson": JSON_LINES, ".json": JSON_LINES}


def open_import(name: str) -> BinaryIO:
    """The file ``name`` for reading (``-``: standard input); raises OSError."""
    return sys.stdin.buffer if name == "-" else Path(name).open("rb")


async def _chunks(source: BinaryIO) -> AsyncIterator[bytes]:
    # read1: what a pipe has now, so that lines are imported as a producer writes them; in
    # a thread, so that a slow producer does not hold the event loop (and its Redis I/O).
    read = getattr(source, "read1", source.read)
    while chunk := await asyncio.to_thread(read, READ_SIZE):
        yield chunk


def _survey(source: BinaryIO, given: str | None, name: str) -> tuple[str | None, int | None]:
    """The format (given, by the extension, or by the first line that is not blank) and the
    number of lines holding a user, for the progress bar; (format, None) for a stream."""
    fmt = given or _SUFFIXES.get(Path(name).suffix.lower())
    if name == "-" or not source.seekable():
        return fmt, None
    lines, first, last = 0, None, b"\n"
    while chunk := source.read(READ_SIZE):
        lines += chunk.count(b"\n")
        last = chunk[-1:]
        if first is None:
            first = next((part for part in chunk.split(b"\n") if part.strip()), None)
    source.seek(0)
    lines += last != b"\n"
    fmt = fmt or format_of(first or b"")
    return fmt, max(0, lines - (fmt == CSV))


def _unsized() -> bool:
    """Whether the terminal on stderr gives no size."""
    try:
        return tuple(os.get_terminal_size(sys.stderr.fileno())) == (0, 0)
    except OSError:
        return True


def _describe(result: LineResult, dry_run: bool) -> str:
    if result.action == REFUSED:
        return f"line {result.line}: refused: {result.reason}"
    verb = {CREATED: "create", UPDATED: "update"}[result.action]
    text = f"line {result.line}: {'would ' + verb if dry_run else verb + 'd'} " \
           f"{result.user_id or '(new id)'} {result.email}"
    if result.fields:
        # The outcome of a plan change (upgrade now, downgrade at the reset) by its first
        # field, plan or limit.
        terms = next((name for name in result.fields if name in ("plan", "limit")), None)
        text += ": " + ", ".join(f"{name} ({result.plan_change})" if name == terms
                                 and result.plan_change else name for name in result.fields)
    return text


def _text(summary: ImportSummary) -> str:
    s = summary
    # A rate over less than a second says more about start-up than about the import.
    rate = f", {s.lines / s.seconds:,.0f} users/s" if s.seconds >= 1 else ""
    if s.dry_run:
        return (f"dry run, nothing written: {s.lines:,} lines: {s.created:,} to create, "
                f"{s.updated:,} to update, {s.unchanged:,} unchanged, {s.refused:,} refused "
                f"({s.seconds:.1f} s{rate})")
    return (f"{s.lines:,} lines: {s.created:,} created, {s.updated:,} updated, "
            f"{s.unchanged:,} unchanged, {s.refused:,} refused ({s.seconds:.1f} s{rate})")


async def import_users(args: argparse.Namespace, admin: Admin, source: BinaryIO, *,
                       by: str) -> ImportSummary:
    """Run the import of ``source`` and print it; the summary (its refusals decide the exit
    status)."""
    fmt, total = _survey(source, args.format, args.file)
    bar = None
    if sys.stderr.isatty():
        # A terminal that gives no size (a pseudo-terminal never sized) gets a common one:
        # tqdm would draw nothing in 0 columns.
        unsized = _unsized()
        bar = tqdm(total=total, unit=" users", desc="dry run" if args.dry_run else "import",
                   file=sys.stderr, dynamic_ncols=not unsized, ncols=80 if unsized else None,
                   mininterval=0.25, smoothing=0.1)

    def say(text: str) -> None:
        if bar is not None:
            bar.write(text, file=sys.stdout)
        else:
            print(text)

    def on_result(result: LineResult) -> None:
        if args.json:
            return
        if result.action == REFUSED or (args.changes and result.action in (CREATED, UPDATED)):
            say(_describe(result, args.dry_run))

    def on_progress(done: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    run = UserImport(admin, dry_run=args.dry_run, by=by, keep_changes=args.changes,
                     on_result=on_result, on_progress=on_progress)
    try:
        summary = await run.run(_chunks(source), fmt)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary.to_json()) if args.json else _text(summary))
    return summary
