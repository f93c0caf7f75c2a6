"""What the relay must answer to one command line, given what came before: the model the
session fuzzer (tests/flows/test_fuzz.py) checks every reply against.

It follows aiosmtpd's dispatch (line checks, the per-connection AUTH budget, the budget of
unrecognised commands) and RFC 5321/4954 for the verbs; the relay's own decisions (who may
send from which address, which recipients the upstream refuses) come from the fixture's
users and upstream. The model is independent of the relay's code except for one thing: the
address a MAIL/RCPT argument names is the one aiosmtpd's parser finds (``parse_path``).

Where the relay is known to be wrong today, the model says so by name (``KNOWN_ISSUES``):
each entry lets through exactly the pattern of one known defect, and is deleted when
that item is fixed, so the fuzzer then holds the relay to the fix.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP

from relay.smtp.protocol import RelaySMTP

# Known defects still open; each names what the model lets through meanwhile. Delete an
# entry when its fix lands: the fuzzer then fails on the pattern again.
KNOWN_ISSUES: dict[str, str] = {}
# Items 3, 5, 6, 9 and 10 were let through here until their fixes landed on main (merged):
# invalid UTF-8 and control characters are now refused as syntax errors, client
# misbehaviour logs no traceback, and a TLS handshake has its own deadline.
KNOWN_TRACEBACKS: frozenset[str] = frozenset()

USER_LOGIN = "agent@kw.test"
USER_SENDERS = frozenset({"agent@kw.test", "alias@kw.test"})  # the user credential's own
OTHER_SENDERS = frozenset({"other@kw.test"})  # another user's
APP_LOGIN = "smartplans"  # an app credential, deciding at the end of DATA (timeline)
REFUSED_RCPT = "refused@example.test"  # the upstream answers 550
DEFERRED_RCPT = "later@example.test"  # the upstream answers 451
MAX_RECIPIENTS = 5
MAX_MESSAGE_SIZE = 20_000
COMMAND_LIMIT = 512  # aiosmtpd's command_size_limit (MAIL grows by 36 per EHLO)
LINE_LIMIT = 1001  # aiosmtpd's line_length_limit: longer lines are refused unread
VERBS = frozenset(name[5:] for name in dir(RelaySMTP) if name.startswith("smtp_"))
CONTROL = frozenset([*range(32), 127])
# A dot-atom address at a host name: what every upstream takes as it is.
PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9._%+!-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def parse_path(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's reading of a MAIL/RCPT argument: (address, parameters) or (None, None)."""
    parser = RelaySMTP.__new__(RelaySMTP)
    parser.local_part_limit = 0
    return SMTP._getaddr(parser, arg)  # an exception here would be the relay's too


def written_address(path: str) -> str | None:
    """The address as the client wrote it: the text between "<" and its ">" (a ">" in a
    quoted local part does not close it), or the first word of a bare path."""
    text = path.lstrip()
    if not text.startswith("<"):
        return text.split(None, 1)[0] if text.split() else ""
    quoted = escaped = False
    for at, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return text[1:at]
    return None


def not_as_written(path: str, address: str) -> bool:
    """Whether the parser's address differs from the one written (a comment, a source
    route, blanks inside <...>): the relay may only acknowledge what it forwards as is."""
    return address not in ("", "<>") and address != written_address(path)


def has_domain(address: str) -> bool:
    """local-part "@" domain, both non-empty; an "@" in a quoted local part is not one."""
    if address.startswith('"'):
        end = re.search(r'(?<!\\)"', address[1:])
        rest = address[end.end() + 1:] if end else ""
        return rest.startswith("@") and len(rest) > 1
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain)


def address_problems(arg: str, address: str | None = None) -> set[str]:
    """Why the address in ``arg`` (up to the parameters), or ``address`` as the parser read
    it, must be refused, by the model's own rules: a C0 control or DEL anywhere in <...>
    (RFC 5321 §4.1.2 allows none), bytes that are not UTF-8 (surrogate-escaped by
    aiosmtpd)."""
    path = arg[:arg.index(">") + 1] if "<" in arg and ">" in arg else arg.split(" ")[0]
    text = path + (address or "")
    found = set()
    if any(ord(c) in CONTROL for c in text):
        found.add("control")
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        found.add("bad_utf8")
    return found


STRICT_REFUSAL = frozenset({500, 501, 550, 553})
# What each open item lets through for an address with that problem, at MAIL and at RCPT
# (RCPT decided at DATA: the app credential's route).
TOLERATED = {
    ("control", "mail"): ("item6", {250, 501, 550, 553}),
    ("bad_utf8", "mail"): ("item5", {451, 501, 550, 553}),
    ("control", "rcpt"): ("item6", {250, 501, 550, 553}),
    ("control", "rcpt_deferred"): ("item6", {250, 501, 550, 553}),
    ("bad_utf8", "rcpt"): ("item5", {451, 501, 553}),
    ("bad_utf8", "rcpt_deferred"): ("item5", {250, 451, 501, 553}),
}


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


def decode64(blob: bytes) -> bytes | None:
    try:
        return base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Prediction:
    """The reply codes allowed for one line; ``closes``: the relay then hangs up; ``then``
    updates the model from the code actually received."""

    allowed: frozenset[int]
    reason: str
    closes: bool = False
    then: Callable[[int], None] | None = None
    challenge: str | None = None  # "plain", "login_user", "login_password": a 334 is due


def only(code: int, reason: str, **kwargs: object) -> Prediction:
    return Prediction(frozenset({code}), reason, **kwargs)  # type: ignore[arg-type]


@dataclass
class Credentials:
    user_password: str
    app_password: str


@dataclass
class SessionModel:
    """One connection's state as the relay must see it."""

    credentials: Credentials
    helo: str | None = None  # "HELO" or "EHLO" once greeted
    tls: bool = False
    principal: str | None = None  # "user" or "app" once authenticated
    sender: str | None = None  # MAIL accepted
    recipients: list[str] = field(default_factory=list)
    auth_budget: int = 5  # server.COMMAND_LIMITS
    bogus_budget: int = 5  # aiosmtpd's BOGUS_LIMIT
    mail_limit: int = COMMAND_LIMIT
    # A known issue let something into the transaction (a sender accepted anyway, a
    # recipient kept after a 451): the end of DATA may refuse the message.
    sender_problem: str | None = None
    smtputf8: bool = False  # the transaction's MAIL FROM had SMTPUTF8
    kept: int = 0  # recipients the relay kept after a 451 (item 5): they count to the maximum
    pending_login: bytes | None = None  # AUTH LOGIN: the user name given so far
    tolerated: list[str] = field(default_factory=list)  # known-issue patterns hit

    def reset_transaction(self) -> None:
        self.sender = None
        self.sender_problem = None
        self.kept = 0
        self.recipients = []

    def after_starttls(self) -> None:
        """RFC 3207 §4.2: all knowledge from before TLS is discarded."""
        self.tls = True
        self.helo = None
        self.principal = None
        self.reset_transaction()

    # -- one command line ------------------------------------------------------------------
    def command(self, line: bytes) -> Prediction:
        """``line`` without its CRLF (and with no LF inside)."""
        if not line.rstrip(b"\r"):
            return only(500, "empty line")
        if len(line) + 2 > LINE_LIMIT:
            return only(500, "line over the stream limit")
        verb_bytes, _, arg_bytes = line.rstrip(b"\r").partition(b" ")
        try:
            verb = verb_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            return only(500, "verb not ASCII")
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
        limit = self.mail_limit if verb == "MAIL" and self.helo == "EHLO" else COMMAND_LIMIT
        if len(line.rstrip(b"\r")) > limit:
            return only(500, "command over its size limit")
        if verb == "AUTH":
            self.auth_budget -= 1
            if self.auth_budget < 0:
                return only(421, "sixth AUTH on one connection", closes=True)
        if verb not in VERBS:
            self.bogus_budget -= 1
            if self.bogus_budget < 1:
                return only(502, "fifth unrecognised command", closes=True)
            return only(500, "unrecognised command")
        if arg and any(0xDC80 <= ord(c) <= 0xDCFF for c in arg):
            return only(500, "argument not UTF-8")  # RFC 6531 §3.3
        if any(byte in CONTROL for byte in line):
            # RFC 5321 §4.1.2; anywhere in the line as sent, the blanks aiosmtpd strips
            # around the argument and a CR before the CRLF included.
            return only(501, "control character in a command")
        return getattr(self, f"_{verb.lower()}")(arg)

    def _helo(self, arg: str | None) -> Prediction:
        return self._greet("HELO", arg)

    def _ehlo(self, arg: str | None) -> Prediction:
        return self._greet("EHLO", arg)

    def _greet(self, verb: str, arg: str | None) -> Prediction:
        if not arg:
            return only(501, f"{verb} without a name")
        self.helo = verb
        self.reset_transaction()
        if verb == "EHLO":
            self.mail_limit += 36  # aiosmtpd adds room for SIZE= and SMTPUTF8 per EHLO
        return only(250, "greeting")

    def _noop(self, arg: str | None) -> Prediction:
        return only(250, "NOOP")

    def _quit(self, arg: str | None) -> Prediction:
        if arg:
            return only(501, "QUIT with an argument")
        return only(221, "QUIT", closes=True)

    def _rset(self, arg: str | None) -> Prediction:
        if arg:
            return only(501, "RSET with an argument")
        self.reset_transaction()
        return only(250, "RSET")

    def _vrfy(self, arg: str | None) -> Prediction:
        # Never 250: the relay cannot vouch for an address (RFC 5321 §3.5.3 allows 252).
        return Prediction(frozenset({252, 501, 502}), "VRFY")

    def _help(self, arg: str | None) -> Prediction:
        return Prediction(frozenset({250, 501}), "HELP")

    def _expn(self, arg: str | None) -> Prediction:
        return only(502, "EXPN")

    def _starttls(self, arg: str | None) -> Prediction:
        if arg:
            return only(501, "STARTTLS with an argument")
        if self.tls:
            return only(503, "STARTTLS inside TLS")  # RFC 3207 §4: no second TLS layer
        return only(220, "STARTTLS")

    def _auth(self, arg: str | None) -> Prediction:
        if self.helo is None:
            return only(503, "AUTH before EHLO")
        if self.helo != "EHLO":
            return only(500, "AUTH after HELO")
        if self.principal is not None:
            return only(503, "AUTH when authenticated")
        if not arg:
            return only(501, "AUTH without a mechanism")
        args = arg.split()
        if len(args) > 2:
            return only(501, "AUTH with too many values")
        mechanism = args[0]
        if mechanism not in ("PLAIN", "LOGIN"):
            return only(504, "unknown mechanism")
        initial = args[1].encode("utf-8", "surrogateescape") if len(args) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                return only(334, "PLAIN challenge", challenge="plain")
            blob = decode64(initial)
            if blob is None:
                return only(501, "PLAIN initial response not base64")
            return self._plain(blob)
        if initial is None:
            return only(334, "LOGIN user name challenge", challenge="login_user")
        login = decode64(initial)
        if login is None:
            return only(501, "LOGIN initial response not base64")
        self.pending_login = login
        return only(334, "LOGIN password challenge", challenge="login_password")

    def answer(self, challenge: str, line: bytes) -> Prediction:
        """The reply to a line answering a 334 (not a command: no budgets, no verbs)."""
        blob = line.strip()
        if blob == b"*":
            return only(501, "AUTH aborted with *")
        decoded = decode64(blob)
        if decoded is None:
            return only(501, "answer not base64")
        if challenge == "plain":
            return self._plain(decoded)
        if challenge == "login_user":
            self.pending_login = decoded
            return only(334, "LOGIN password challenge", challenge="login_password")
        login, self.pending_login = self.pending_login or b"", None
        return self._check(login, decoded)

    def _plain(self, blob: bytes) -> Prediction:
        parts = blob.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return only(501, "malformed PLAIN response")
        return self._check(parts[1], parts[2])

    def _check(self, login: bytes, password: bytes) -> Prediction:
        creds = self.credentials
        if login == USER_LOGIN.encode() and password == creds.user_password.encode():
            self.principal = "user"
            return only(235, "user credential")
        if login == APP_LOGIN.encode() and password == creds.app_password.encode():
            self.principal = "app"
            return only(235, "app credential")
        return only(535, "wrong credentials")

    def _mail(self, arg: str | None) -> Prediction:
        if self.helo is None:
            return only(503, "MAIL before EHLO")
        if arg is None or not arg[:5].upper() == "FROM:":
            return only(501, "MAIL without FROM:")
        path = arg[5:].strip()
        address, params = parse_path(path)
        if address is None:
            return only(553, "MAIL: no address the parser can read")
        if not_as_written(path, address):
            return only(501, "MAIL: the parser would change the address")
        if address not in ("", "<>") and not has_domain(address):
            return only(501, "MAIL: no domain")  # RFC 5321 §4.1.2
        if not address:
            return only(501, "MAIL FROM:<>: the relay sends no bounces")
        if self.helo != "EHLO" and params:
            return only(501, "parameters after HELO")
        if self.sender is not None:
            return only(503, "nested MAIL")
        options = (params or "").upper().split()
        code = self._mail_parameters(options)
        if code:
            return only(code, "MAIL parameters")
        if self.principal is None:
            return only(530, "MAIL before AUTH")
        smtputf8 = "SMTPUTF8" in options
        if not address.isascii() and not smtputf8:
            return only(553, "non-ASCII sender without SMTPUTF8")  # RFC 6531 §3.4
        problems = address_problems(path, address)
        if problems:
            return self._refuse_or_tolerate(problems, "mail", "sender",
                                            lambda c: self._mail_done(c, address, "known"))
        # Only A-Z match in any case: a non-ASCII look-alike (KELVIN SIGN for K) is never one
        # of these ASCII addresses.
        owned = address.isascii() and address.lower() in (
            USER_SENDERS if self.principal == "user" else USER_SENDERS | OTHER_SENDERS)
        if not owned:
            return only(553 if self.principal == "user" else 550, "sender not allowed")
        return only(250, "sender allowed",
                    then=lambda c: self._mail_done(c, address, smtputf8=smtputf8))

    def _mail_done(self, code: int, address: str, problem: str | None = None, *,
                   smtputf8: bool = False) -> None:
        # ``problem``: accepted although the model would refuse it (an open item)
        if code == 250:
            self.sender = address
            self.sender_problem = problem
            self.smtputf8 = smtputf8

    @staticmethod
    def _mail_parameters(options: list[str]) -> int:
        """aiosmtpd's checks of MAIL parameters: 0 when they are acceptable."""
        params: dict[str, str | bool] = {}
        for option in options:
            name, eq, value = option.partition("=")
            if not name.isalnum() or (eq and not value):
                return 501
            params[name] = value if eq else True
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            return 501
        if not isinstance(params.pop("SMTPUTF8", False), bool):
            return 501
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not size.isdigit():
                return 501
            if int(size) > MAX_MESSAGE_SIZE:
                return 552
        return 555 if params else 0

    def _rcpt(self, arg: str | None) -> Prediction:
        prediction = self._rcpt_reply(arg)
        if self.kept and len(self.recipients) + self.kept >= MAX_RECIPIENTS and (
                prediction.allowed & {250}):
            # The relay counts the recipients item 5 made it keep: the maximum comes sooner.
            return Prediction(prediction.allowed | {452}, f"{prediction.reason} (or 452)",
                              then=prediction.then)
        return prediction

    def _rcpt_reply(self, arg: str | None) -> Prediction:
        if self.helo is None:
            return only(503, "RCPT before EHLO")
        if self.sender is None:
            return only(503, "RCPT before MAIL")
        if arg is None or not arg[:3].upper() == "TO:":
            return only(501, "RCPT without TO:")
        path = arg[3:].strip()
        address, params = parse_path(path)
        if address is None:
            return only(553, "RCPT: no address the parser can read")
        if not_as_written(path, address):
            return only(501, "RCPT: the parser would change the address")
        if address not in ("", "<>") and not has_domain(address):
            return only(501, "RCPT: no domain")  # RFC 5321 §4.1.2
        if not address:
            return only(501, "RCPT TO:<>")
        if self.helo != "EHLO" and params:
            return only(501, "parameters after HELO")
        options = (params or "").upper().split()
        if any(not o.partition("=")[0].isalnum() or (o.partition("=")[1]
                                                     and not o.partition("=")[2])
               for o in options):
            return only(501, "RCPT parameter syntax")
        if options:
            return only(555, "RCPT parameters")
        if not address.isascii() and not self.smtputf8:
            return only(553, "non-ASCII recipient without SMTPUTF8")  # RFC 6531 §3.4
        if len(self.recipients) >= MAX_RECIPIENTS:
            return only(452, "too many recipients")
        problems = address_problems(path, address)
        deferred = self.principal == "app"
        if problems:
            # At debug level item 5's 451 on a deferred RCPT comes from logging the accepted
            # recipient: the relay keeps it (and refuses the message at DATA).
            return self._refuse_or_tolerate(
                problems, "rcpt_deferred" if deferred else "rcpt", "recipient",
                lambda c: self._rcpt_done(c, address, taint=deferred and "bad_utf8" in problems))
        if not PLAIN_ADDRESS.fullmatch(address):
            # Non-ASCII without SMTPUTF8, or no domain: the upstream may refuse it (RFC
            # 6531 §3.4); what counts is that the answer mirrors the upstream's.
            return Prediction(frozenset({250, 501, 550, 553}), "unusual recipient",
                              then=lambda c: self._rcpt_done(c, address))
        if not deferred and address.lower() == REFUSED_RCPT:
            return only(550, "upstream refuses the recipient")
        if not deferred and address.lower() == DEFERRED_RCPT:
            return only(451, "upstream defers the recipient")
        return only(250, "recipient", then=lambda c: self._rcpt_done(c, address))

    def _rcpt_done(self, code: int, address: str, taint: bool = False) -> None:
        if code == 250:
            self.recipients.append(address)
        elif taint and code == 451:
            self.sender_problem = "recipient kept after a 451"
            self.kept += 1

    def _data(self, arg: str | None) -> Prediction:
        if self.helo is None:
            return only(503, "DATA before EHLO")
        if not self.recipients:
            return only(503, "DATA without recipients")
        if arg:
            return only(501, "DATA with an argument")
        return only(354, "DATA")

    def end_of_data(self, body: bytes) -> Prediction:
        """The reply after ``body`` and the final dot (``body`` in wire form)."""
        longest = max((len(x) + 2 for x in body.split(b"\r\n")[:-1]), default=0)
        recipients = self.recipients
        prediction = self._end_of_data(body, longest, recipients)
        self.reset_transaction()
        return prediction

    def _end_of_data(self, body: bytes, longest: int, recipients: list[str]) -> Prediction:
        if longest > LINE_LIMIT:
            return only(500, "line too long in DATA")
        if len(body) > MAX_MESSAGE_SIZE:
            return only(552, "message too big")
        if self.principal == "app":  # decided at DATA: the message goes whole or not at all
            if self.sender_problem:
                return Prediction(frozenset({250, 451, 550, 553, 554}), "unusual sender")
            for recipient in recipients:  # the upstream's first refusal answers for all
                if not PLAIN_ADDRESS.fullmatch(recipient):
                    return Prediction(frozenset({250, 451, 550, 553, 554}),
                                      "unusual recipient")
                if recipient.lower() == REFUSED_RCPT:
                    return Prediction(frozenset({550, 554}), "upstream refuses a recipient")
                if recipient.lower() == DEFERRED_RCPT:
                    return only(451, "upstream defers a recipient")
        return only(250, "message accepted")

    def _refuse_or_tolerate(self, problems: set[str], where: str, what: str,
                            then: Callable[[int], None]) -> Prediction:
        """A 5xx refusal for an address with ``problems``, or what an open item lets
        through instead (noted when it happens)."""
        allowed: set[int] = set()
        items = []
        for problem in sorted(problems):
            item, tolerated = TOLERATED[(problem, where)]
            if item in KNOWN_ISSUES:
                allowed |= tolerated
                items.append(item)
            else:
                allowed |= STRICT_REFUSAL
        if not items:
            return Prediction(STRICT_REFUSAL, f"{what} with {', '.join(sorted(problems))}")

        def noted(code: int) -> None:
            if code // 100 == 2 or code == 451:  # what the items are about
                self.tolerated.extend(items)
            then(code)
        return Prediction(frozenset(allowed), f"{what}: known issue {', '.join(items)}",
                          then=noted)
