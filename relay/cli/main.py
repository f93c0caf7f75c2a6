"""``command-relay`` (also ``python -m relay``): parses arguments, then runs the relay
(``relay.process``) or an operator command (``relay.admin``).

Operators script these commands, so output is stable: ``--json`` prints one JSON document,
errors go to stderr as ``command-relay: error: …`` with exit status 1 (2 for bad usage).
Admin commands use the same settings as ``serve``, so ``RELAY_REDIS_URL=… command-relay users
add …`` acts on the Redis that ``serve`` uses (or on the embedded development one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import structlog

from relay.admin.operations import Admin, AdminError
from relay.cli.commands import ADMIN_COMMANDS, AdminCommand, CommandError, check_config
from relay.cli.parser import PROG, build_parser
from relay.cli.shadow import ShadowLogError, report_from_log
from relay.cli.suppress import suppress
from relay.config.parsers import SettingsError
from relay.config.policies import PolicyError, load_policies
from relay.config.settings import Settings, load_settings
from relay.decisions.months import SystemClock
from relay.delivery.credentials import CredentialStore, load_key
from relay.errors import StartupError, StoreUnavailableError
from relay.identity.accounts import AccountError
from relay.observe.logs import configure_logging
from relay.process import eventloop
from relay.process.link import WorkerLink, tag_logs
from relay.process.redis import redis_for, wait_for_redis
from relay.process.serve import run_notifier, serve
from relay.process.supervisor import Supervisor
from relay.store.embedded import EmbeddedRedisError

log = structlog.get_logger()
# The admin commands, with those that have a module of their own.
COMMANDS: dict[str, AdminCommand] = {**ADMIN_COMMANDS, "suppress": suppress}


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """One relay process, one worker of a supervisor, or the supervisor of N workers."""
    if args.worker:
        try:
            link = WorkerLink.from_spec(args.worker)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        tag_logs(link.index)
        eventloop.run(serve(settings, link), settings.event_loop)
        return 0
    workers = args.workers or settings.workers or os.cpu_count() or 1
    if workers == 1:
        eventloop.run(serve(settings), settings.event_loop)
        return 0
    # Refuse a bad RELAY_EVENT_LOOP here rather than in every worker.
    eventloop.loop_factory(settings.event_loop)
    return asyncio.run(Supervisor(settings, workers, config=args.config).run())


async def _run_admin(command: AdminCommand, args: argparse.Namespace,
                     settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    async with redis_for(settings) as redis:
        await wait_for_redis(redis, 2)
        credentials = CredentialStore(redis, lambda: load_key(settings.credentials_key,
                                                              settings.state_dir))
        await command(args, settings, Admin(redis, policies, SystemClock(),
                                            settings.default_tz, credentials))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "usage" and not args.user and not args.all:
        parser.error("usage: name a USER, or use --all")
    try:
        settings = load_settings(config_file=args.config)
        serving = args.command in ("serve", "notifier")
        if serving:
            configure_logging(settings.log_format, settings.log_level)
        else:
            # Admin commands print their results on stdout (one JSON document with --json),
            # so their warnings go to stderr: one readable line each next to human output,
            # JSON lines with --json (or RELAY_LOG_FORMAT=json) for a script to parse.
            machine = getattr(args, "json", False) or settings.log_format == "json"
            configure_logging("json" if machine else "line", "warning", stream=sys.stderr)
        if args.command == "serve":
            return _serve(args, settings)
        elif args.command == "notifier":
            eventloop.run(run_notifier(settings), settings.event_loop)
        elif args.command == "check-config":
            check_config(settings)
        elif args.command == "shadow" and args.log is not None:
            report_from_log(args)  # the log alone: no Redis needed
        else:
            asyncio.run(_run_admin(COMMANDS[args.command], args, settings))
    except (SettingsError, PolicyError, AccountError, AdminError, CommandError, StartupError,
            EmbeddedRedisError, eventloop.EventLoopError, ShadowLogError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailableError:
        print(f"{PROG}: error: Redis is unreachable", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`command-relay users list | head`): not an error worth a
        # traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
