"""``command-relay suppress add|remove|list|import|export``: the suppression list from the
command line (the work is in ``relay.admin.suppressions``, shared with the admin API).

``import`` streams its file (64 KiB at a time, never the whole file in memory) and shows a
progress bar on standard error when that is a terminal; it prints a summary and exits 1 when
any line was refused (the other lines are imported). ``export`` writes the CSV to standard
output, one list at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from typing import BinaryIO

from tqdm import tqdm

from relay.admin.operations import Admin
from relay.admin.suppression_csv import iso_time
from relay.admin.suppressions import ImportSummary, SuppressionOps, entry_view, scope_name
from relay.cli.commands import CommandError
from relay.config.settings import Settings

CHUNK = 64 * 1024
# The source an entry made with `suppress add` names.
SOURCE = "cli"


async def suppress(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    ops = SuppressionOps(admin)
    if args.action == "add":
        entry, created = await ops.add(args.address, user=args.user, reason=args.reason,
                                       source=SOURCE)
        print(f"{entry.address} suppressed on {scope_name(entry.user_id)} "
              f"({entry.reason.value})" + ("" if created else ", replacing its entry"))
    elif args.action == "remove":
        entry = await ops.remove(args.address, user=args.user)
        print(f"{entry.address} removed from {scope_name(entry.user_id)} "
              f"(was {entry.reason.value})")
    elif args.action == "list":
        entries = await ops.listing(args.user)
        if args.json:
            print(json.dumps([entry_view(e) for e in entries]))
            return
        print(f"{'SCOPE':<14} {'ADDRESS':<36} {'REASON':<12} {'SOURCE':<10} TIME")
        for e in entries:
            print(f"{e.scope:<14} {e.address:<36} {e.reason.value:<12} {e.source:<10} "
                  f"{iso_time(e.at)}")
    elif args.action == "export":
        async for chunk in ops.export_csv(args.user):
            sys.stdout.write(chunk)
        sys.stdout.flush()
    else:
        await _import(ops, args)


async def _import(ops: SuppressionOps, args: argparse.Namespace) -> None:
    if args.file == "-":
        summary = await ops.import_csv(_chunks(sys.stdin.buffer))
    else:
        try:
            source = await asyncio.to_thread(open, args.file, "rb")
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
        with source:
            summary = await ops.import_csv(_chunks(source))
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        _show(summary, "standard input" if args.file == "-" else args.file)
    if summary.refused:
        raise CommandError(f"{summary.refused:,} line(s) refused (see the summary); the other "
                           "lines were imported")


async def _chunks(source: BinaryIO) -> AsyncIterator[bytes]:
    """The file's bytes, CHUNK at a time, counted on a progress bar (standard error, only on
    a terminal; its total is the file's size when it has one)."""
    info = os.fstat(source.fileno())
    total = info.st_size if stat.S_ISREG(info.st_mode) else None
    terminal = sys.stderr.isatty()
    # A terminal that gives no size (a pseudo-terminal never sized, as under `script`) gets
    # a common one: tqdm would draw nothing in 0 columns and hide its bar below row 0.
    unsized = terminal and _size() == (0, 0)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="importing",
              file=sys.stderr, disable=not terminal, ncols=80 if unsized else None,
              nrows=24 if unsized else None) as bar:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            bar.update(len(chunk))
            yield chunk


def _size() -> tuple[int, int]:
    """(columns, lines) of the terminal on stderr; (0, 0) when it does not say."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        return 0, 0
    return size.columns, size.lines


def _show(summary: ImportSummary, name: str) -> None:
    print(f"imported {name}: {summary.added:,} added, {summary.replaced:,} replaced, "
          f"{summary.refused:,} refused")
    for line, reason in summary.refusals:
        print(f"  line {line}: {reason}")
    if summary.refused > len(summary.refusals):
        print(f"  … and {summary.refused - len(summary.refusals):,} more refused lines")
