"""The SMTP path's Redis calls (a script or an HGET per step) without redis-py's per-command
machinery.

redis-py 8 spends about 130 µs of CPU on one command through ``Redis.execute_command`` on
this machine: the retry wrapper, the blocking pool's condition and timeout, its
observability records and event dispatch, a task for the write timeout. The socket work
itself is about 45 µs. A message takes five such calls (the sender, the global suppression
list, the reservation, the claim, the commit), so that machinery was a fifth of the relay's
CPU per message (bench/README.md). Here a call takes a connection straight from the pool's
idle list, writes the packed command and reads the reply with the connection's own parser,
then puts the connection back: about 65 µs.

What stays as redis-py does it, because it is redis-py doing it: connecting (AUTH, SELECT,
TLS), packing, parsing, the reply's errors (``NoScriptError``, ``BusyLoadingError``…), the
read timeout (``socket_timeout``: a ``TimeoutError``, and the connection is dropped), and
closing (the connections are the pool's, so ``aclose()`` closes them). What is kept of its
policy: a ``ConnectionError`` (a connection a Redis restart or failover broke) is tried once
more at once on the same connection object, which reconnects; a timeout is not (settings:
``redis_timeout``). A connection is put back only after a whole reply was read, or after it
was disconnected, so no reply is ever left for the next command to read.

Only for a plain pool (one server, or through a TLS connection to it): Sentinel's and
Cluster's pools pick their server per connection, and a pipeline (``client=`` of a script
call, used by the WAIT of ``eval_replicated``) goes through redis-py. When the pool has no
idle connection and is at its size, or under maintenance, a call waits for one through the
pool's own ``get_connection`` (up to the timeout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript

# What redis-py packs as a command argument.
Arg = str | int | float | bytes | memoryview


class HotPathPool(BlockingConnectionPool):
    """redis-py's blocking pool, with the hot path's calls (``execute``, ``execute_many``).

    A call takes an idle connection straight from the pool's own lists
    (``_available_connections``, ``_in_use_connections``) and puts it back there, so a
    connection is always idle, in use by one caller, or disconnected and idle: the states
    redis-py's ``get_connection`` and ``release`` keep, and theirs are used whenever a caller
    must wait (none idle and the pool at its size, or under maintenance) or someone waits.
    ``usable`` says whether this version of redis-py still has those lists (if not, every
    call takes redis-py's own way).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Checked once: every call of the SMTP path asks.
        self._usable = all(hasattr(self, name) for name in (
            "_available_connections", "_in_use_connections", "_condition", "_in_maintenance"))

    def usable(self) -> bool:
        return self._usable

    async def _take(self) -> AbstractConnection:
        """A connection marked in use: an idle one (or a new one under the size) at once,
        else through ``get_connection``, which waits up to the timeout."""
        if self._in_maintenance or not self.can_get_connection():
            waited: AbstractConnection = await self.get_connection()  # type: ignore[no-untyped-call, unused-ignore]
            return waited
        found: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call, unused-ignore]
        return found

    async def _give_back(self, connection: AbstractConnection) -> None:
        if self._condition._waiters:
            # Someone waits in get_connection: release() wakes them.
            await self.release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)

    async def execute(self, *args: Arg) -> Any:
        """One command, its reply as the connection parsed it (no response callback: only
        for commands redis-py has none for, EVALSHA and HGET here). Raises redis-py's
        errors."""
        return (await self.execute_many([args]))[0]

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands in one write, their replies in order (as ``execute``)."""
        connection = await self._take()
        try:
            return await _exchange(connection, commands)
        finally:
            await self._give_back(connection)


async def _exchange(connection: AbstractConnection,
                    commands: Sequence[Sequence[Arg]]) -> list[Any]:
    packed = [chunk for command in commands for chunk in connection.pack_command(*command)]
    for attempt in (1, 2):
        replies: list[Any] = []
        try:
            if not connection.is_connected:
                await connection.connect()  # type: ignore[no-untyped-call, unused-ignore]
            writer = connection._writer
            if writer is None:
                raise redis.exceptions.ConnectionError("not connected")
            # A few commands are a few hundred bytes: they fit the transport's buffer, so
            # there is nothing to drain; a dead socket shows in the read below.
            writer.writelines(packed)
            for _ in commands:
                replies.append(await connection.read_response())
            return replies
        except redis.exceptions.ConnectionError:
            await connection.disconnect(nowait=True)
            if attempt == 2:
                raise
        except redis.exceptions.ResponseError:
            if len(replies) + 1 < len(commands):
                # Replies of later commands are still to come: out of step now.
                await connection.disconnect(nowait=True)
            raise  # a whole error reply was read: the connection is fine otherwise
        except BaseException:
            # A timeout, a cancellation, anything: a reply may still come, so the
            # connection cannot carry another command.
            await connection.disconnect(nowait=True)
            raise
    raise AssertionError("unreachable")


def hot_path(client: Any) -> HotPathPool | None:
    """The pool whose hot path ``client``'s calls take, or None when they must take
    redis-py's way."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(client, Redis) and type(pool) is HotPathPool and pool.usable():
        return pool
    return None


class HotScript:
    """A Lua script called as redis-py's ``AsyncScript`` (``await script(keys=…, args=…)``,
    ``client=`` a pipeline), through the hot path when the client has one."""

    def __init__(self, client: Any, source: str) -> None:
        self._script: AsyncScript = client.register_script(source)
        self._hot = hot_path(client)

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Arg] = (),
                       client: Any = None) -> Any:
        if client is not None or self._hot is None:
            return await self._script(keys=keys, args=args, client=client)
        # redis-py's script object holds the source and its SHA1 (Redis's script id).
        call = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        try:
            return await self._hot.execute(*call)
        except redis.exceptions.NoScriptError:
            # A new or flushed server: load it, as redis-py's script object does.
            await self._hot.execute("SCRIPT", "LOAD", self._script.script)
            return await self._hot.execute(*call)


def register_script(client: Any, source: str) -> HotScript:
    """``client.register_script(source)``, through the hot path where there is one."""
    return HotScript(client, source)


async def hget(client: Any, key: str, field: str) -> Any:
    """``await client.hget(key, field)``, through the hot path where there is one."""
    hot = hot_path(client)
    if hot is None:
        return await client.hget(key, field)
    return await hot.execute("HGET", key, field)


def _pairs(reply: Any) -> dict[Any, Any]:
    """HGETALL's reply as redis-py's callback makes it: a dict (a RESP3 map already is one;
    RESP2's is a flat list of fields and values)."""
    if isinstance(reply, dict):
        return reply
    items = list(reply or [])
    return dict(zip(items[0::2], items[1::2], strict=True))


class HotReads:
    """The AUTH path's reads (GET, HGETALL) queued, then sent in one write, as a
    non-transactional redis-py pipeline would send them (``get``, ``hgetall``,
    ``execute``); through redis-py's pipeline where there is no hot path."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._hot = hot_path(client)
        self._commands: list[tuple[Arg, ...]] = []
        self._parsers: list[Any] = []

    def get(self, key: str) -> None:
        self._commands.append(("GET", key))
        self._parsers.append(None)

    def hgetall(self, key: str) -> None:
        self._commands.append(("HGETALL", key))
        self._parsers.append(_pairs)

    async def execute(self) -> list[Any]:
        if self._hot is None:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in self._commands:
                    pipe.execute_command(*command)
                found: list[Any] = await pipe.execute()
                return found
        replies = await self._hot.execute_many(self._commands)
        return [parse(reply) if parse else reply
                for parse, reply in zip(self._parsers, replies, strict=True)]
