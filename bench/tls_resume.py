"""What TLS session resumption saves per connection, measured without sockets or event loops.

``python -m bench.tls_resume [--json] [-n N] [--tls-key p256|rsa2048]``

In one process, over memory BIOs (``ssl.MemoryBIO`` + ``SSLContext.wrap_bio``, client and
server), N full handshakes against N resumed ones (the client passes ``session=`` from its
previous connection), for TLS 1.3 and TLS 1.2, with the relay's own ``server_context`` and a
fresh certificate (ECDSA P-256 by default, bench/tls.py). Each side's CPU time is summed
around its own ``do_handshake`` steps (``time.thread_time``: the one thread does both sides,
so each side's share is the time spent inside its own calls), plus the client's reading of
the TLS 1.3 tickets that follow the handshake. Also reported: the same handshakes with the
server issuing Python's default 2 tickets instead of the relay's 1 (``num_tickets``), and
what one round of ``wrap_bio`` + the pump costs without any handshake work (the Python overhead
floor of this loop).

These are the crypto and OpenSSL state-machine costs only: a real connection adds the
kernel, the event loop's SSL protocol and the SMTP dialogue (docs/benchmark.md has the end
to end figure).
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.tls import KEY_KINDS, write_certificate
from relay.smtp.tls import server_context

SERVER_NAME = "relay.bench.invalid"


@dataclass(frozen=True, slots=True)
class Row:
    name: str  # "tls1.3 full", "tls1.3 resumed", …
    handshakes: int
    server_us: float  # median CPU µs per handshake, server side
    client_us: float  # the same, client side (ticket reading included)
    reused: int  # how many of the handshakes resumed a session


class _Pair:
    """One connection: a client and a server SSLObject joined by memory BIOs."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                 session: ssl.SSLSession | None) -> None:
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.s_in, self.s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname=SERVER_NAME,
                                          session=session)
        self.server_s = 0.0
        self.client_s = 0.0

    def _step(self, side: ssl.SSLObject) -> bool:
        """One do_handshake on ``side``, timed to its account; True once it is done."""
        began = time.thread_time()
        try:
            side.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        spent = time.thread_time() - began
        if side is self.server:
            self.server_s += spent
        else:
            self.client_s += spent
        return done

    def handshake(self) -> None:
        client_done = server_done = False
        for _ in range(20):
            if not client_done:
                client_done = self._step(self.client)
            self.s_in.write(self.c_out.read())
            if not server_done and self.s_in.pending:
                server_done = self._step(self.server)
            self.c_in.write(self.s_out.read())
            if client_done and server_done:
                break
        else:
            raise RuntimeError("the handshake did not finish")
        # TLS 1.3: the server's tickets follow its Finished; the client takes them on its
        # next read (a session is resumable only after that).
        if self.c_in.pending:
            began = time.thread_time()
            try:
                self.client.read(1)
            except ssl.SSLWantReadError:
                pass
            self.client_s += time.thread_time() - began


def client_context(cert: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert)
    context.minimum_version = context.maximum_version = version
    return context


@dataclass(slots=True)
class _Samples:
    server_us: list[float] = field(default_factory=list)
    client_us: list[float] = field(default_factory=list)
    reused: int = 0

    def row(self, name: str) -> Row:
        return Row(name, len(self.server_us), round(statistics.median(self.server_us), 1),
                   round(statistics.median(self.client_us), 1), self.reused)


def measure(into: _Samples, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
            count: int, *, resume: bool) -> None:
    session: ssl.SSLSession | None = None
    if resume:  # the first, full, handshake gives the session the others resume
        first = _Pair(server_ctx, client_ctx, None)
        first.handshake()
        session = first.client.session
    for _ in range(count):
        pair = _Pair(server_ctx, client_ctx, session if resume else None)
        pair.handshake()
        into.server_us.append(pair.server_s * 1e6)
        into.client_us.append(pair.client_s * 1e6)
        into.reused += pair.client.session_reused
        if resume:
            session = pair.client.session  # TLS 1.3 tickets are single use


def overhead(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, count: int) -> float:
    """Median µs of making a pair and pumping empty BIOs: the Python floor of the loop."""
    times = []
    for _ in range(count):
        began = time.thread_time()
        pair = _Pair(server_ctx, client_ctx, None)
        pair.s_in.write(pair.c_out.read())
        pair.c_in.write(pair.s_out.read())
        times.append((time.thread_time() - began) * 1e6)
    return round(statistics.median(times), 1)


def run(count: int, kind: str, rounds: int = 10) -> dict[str, object]:
    """The rows, measured in ``rounds`` interleaved slices so that a busy machine's drift
    falls on every row alike."""
    with tempfile.TemporaryDirectory(prefix="tls-resume-") as work:
        cert, key = write_certificate(Path(work), kind)
        server = server_context(cert, key)
        two_tickets = server_context(cert, key)
        two_tickets.num_tickets = 2  # Python's default; the relay issues 1
        tls13 = client_context(cert, ssl.TLSVersion.TLSv1_3)
        tls12 = client_context(cert, ssl.TLSVersion.TLSv1_2)
        plan = [("tls1.3 full", server, tls13, False), ("tls1.3 resumed", server, tls13, True),
                ("tls1.3 full, 2 tickets", two_tickets, tls13, False),
                ("tls1.3 resumed, 2 tickets", two_tickets, tls13, True),
                ("tls1.2 full", server, tls12, False), ("tls1.2 resumed", server, tls12, True)]
        samples = {name: _Samples() for name, *_ in plan}
        for _, server_ctx, client_ctx, resume in plan:  # warm-up, not counted
            measure(_Samples(), server_ctx, client_ctx, 3, resume=resume)
        for _ in range(rounds):
            for name, server_ctx, client_ctx, resume in plan:
                measure(samples[name], server_ctx, client_ctx, max(1, count // rounds),
                        resume=resume)
        floor = overhead(server, tls13, count)
    return {"key": kind, "openssl": ssl.OPENSSL_VERSION, "python": sys.version.split()[0],
            "num_tickets": server.num_tickets, "pair_overhead_us": floor,
            "rows": [asdict(samples[name].row(name)) for name, *_ in plan]}


def format_table(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    lines = [f"TLS handshake CPU, median µs per handshake ({result['key']} key, "
             f"{result['openssl']}, Python {result['python']})",
             f"{'handshake':<26}{'n':>6}{'server µs':>12}{'client µs':>12}{'resumed':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<26}{r['handshakes']:>6}{r['server_us']:>12.1f}"
                     f"{r['client_us']:>12.1f}{r['reused']:>6}/{r['handshakes']}")
    by_name = {r["name"]: r for r in rows}
    for label in ("tls1.3", "tls1.2"):
        full, resumed = by_name[f"{label} full"], by_name[f"{label} resumed"]
        lines.append(f"{label}: resumption saves {full['server_us'] - resumed['server_us']:.0f}"
                     f" µs server, {full['client_us'] - resumed['client_us']:.0f} µs client "
                     f"per connection")
    lines.append(f"pair set-up + empty pump (Python floor): {result['pair_overhead_us']} µs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_resume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--handshakes", type=int, default=300,
                        help="handshakes per row (default 300)")
    parser.add_argument("--tls-key", choices=KEY_KINDS, default="p256")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    result = run(args.handshakes, args.tls_key)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
