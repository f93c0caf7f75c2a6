"""The one-click unsubscribe headers of a message (RFC 8058, RFC 2369): what it carries, what
an existing DKIM signature lets the relay add, and the bytes of the fields it adds.

The relay looks for the two fields RFC 8058 §3.1 asks of a one-click message:

* ``List-Unsubscribe`` with an HTTPS URI (``<https://…>``; a ``mailto:`` alone is not
  one-click);
* ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``.

An added field must not break a DKIM signature made before the relay. A verifier hashes the
fields named in the signature's ``h=`` tag, and a name listed there that the message does not
carry is signed *as absent* (RFC 6376 §5.4: "over-signing", done on purpose to stop such
additions): adding that field breaks the signature. A field whose name is not in ``h=`` is
outside the signature, so adding one (anywhere in the header) leaves it valid.

The policy (whether to look, refuse or add) is decided in ``relay/smtp/unsubscribe.py``; this
module only reads and writes bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.message.headers import header_length

LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"

_WANTED = (b"list-unsubscribe", b"list-unsubscribe-post", b"dkim-signature")
# An HTTPS URI in angle brackets (RFC 2369 §2: each URI is enclosed in < and >).
_HTTPS_URI = re.compile(r"<\s*https://[^>\s]+\s*>", re.IGNORECASE)
# What a URL put into a header may contain: printable ASCII without the angle brackets that
# delimit it (RFC 2369 §2) or a quote.
_URL = re.compile(r"^https?://[\x21-\x7e]+$")


@dataclass(frozen=True, slots=True)
class UnsubscribeHeaders:
    """The one-click unsubscribe fields of a message's header section.

    ``list_unsubscribe`` and ``post`` are the first such field's value (unfolded, stripped),
    None when absent; ``signed`` the field names (lower case) in the ``h=`` tag of any
    ``DKIM-Signature``."""

    list_unsubscribe: str | None = None
    post: str | None = None
    signed: frozenset[str] = frozenset()

    @property
    def has_https_uri(self) -> bool:
        return self.list_unsubscribe is not None and bool(
            _HTTPS_URI.search(self.list_unsubscribe))

    @property
    def is_one_click(self) -> bool:
        # RFC 8058 §3.1: "the single key/value pair List-Unsubscribe=One-Click"; compared
        # without regard to case, as a form field's key and value are by the mail receivers.
        return self.post is not None and self.post.lower() == ONE_CLICK.lower()

    @property
    def missing(self) -> tuple[str, ...]:
        """The names of the fields one-click unsubscribe needs and the message lacks (or
        carries without what RFC 8058 asks of it), in the order of the RFC."""
        lacking = []
        if not self.has_https_uri:
            lacking.append(LIST_UNSUBSCRIBE)
        if not self.is_one_click:
            lacking.append(LIST_UNSUBSCRIBE_POST)
        return tuple(lacking)

    def signed_as_absent(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``names`` (fields the message lacks) that a DKIM signature covers: adding
        them would break it."""
        return tuple(name for name in names if name.lower() in self.signed)


def read_unsubscribe_headers(content: bytes) -> UnsubscribeHeaders:
    """The unsubscribe fields and the DKIM-signed field names of ``content`` (a message, or
    its header section, as content: not dot-stuffed). Undecodable bytes are replaced."""
    head = content[:header_length(content)]
    lowered = head.lower()
    if not any(name in lowered for name in _WANTED):
        return UnsubscribeHeaders()
    found: dict[str, str] = {}
    signed: set[str] = set()
    for name, value in _fields(head):
        if name == "dkim-signature":
            signed |= signed_fields(value)
        elif name in ("list-unsubscribe", "list-unsubscribe-post") and name not in found:
            found[name] = value.strip(" \t")
    return UnsubscribeHeaders(found.get("list-unsubscribe"), found.get("list-unsubscribe-post"),
                              frozenset(signed))


def signed_fields(dkim_signature: str) -> set[str]:
    """The field names (lower case) of the ``h=`` tag of a DKIM-Signature's value (RFC 6376
    §3.5: a tag-list of ``tag=value`` separated by ``;``, the names separated by ``:``,
    folding white space allowed around each)."""
    for tag in dkim_signature.split(";"):
        key, equals, value = tag.partition("=")
        if equals and key.strip(" \t\r\n") == "h":
            return {name.strip(" \t\r\n").lower() for name in value.split(":")
                    if name.strip(" \t\r\n")}
    return set()


def _fields(head: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of every field of the header section ``head``."""
    fields: list[tuple[str, str]] = []
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            if fields:  # a continuation line: RFC 5322 §2.2.3, unfolding removes the CRLF
                name, value = fields[-1]
                fields[-1] = (name, value + line.decode("utf-8", "replace"))
            continue
        raw_name, colon, raw_value = line.partition(b":")
        if colon:
            fields.append((raw_name.strip(b" \t").lower().decode("ascii", "replace"),
                           raw_value.decode("utf-8", "replace")))
    return fields


def one_click_fields(url: str, *, post: bool = True) -> bytes:
    """The header lines (CRLF-terminated) that make a message one-click unsubscribable at
    ``url``: ``List-Unsubscribe: <url>``, and the ``List-Unsubscribe-Post`` field unless
    ``post`` is False (the message carries one already). ValueError for a URL that could
    break the header (control characters, spaces, angle brackets)."""
    if not _URL.match(url) or any(c in url for c in '<>"'):
        raise ValueError("not a URL that can go into a header")
    lines = f"{LIST_UNSUBSCRIBE}: <{url}>\r\n"
    if post:
        lines += f"{LIST_UNSUBSCRIBE_POST}: {ONE_CLICK}\r\n"
    return lines.encode("ascii")
