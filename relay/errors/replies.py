"""The fixed replies that are not a refusal class: success, AUTH's own answers, and the
replies around DATA (RFC 5321 §4.2, RFC 3463 enhanced codes)."""

from __future__ import annotations

AUTH_SUCCESS = "235 2.7.0 Authentication successful"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64 response"
AUTH_BAD_PLAIN = "501 5.5.2 Malformed AUTH PLAIN response"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"

# DATA as aiosmtpd answers it (relay/smtp/data.py keeps its checks and its texts): no
# recipient yet, an argument after DATA, the go-ahead, and the end of the data when no hook
# gave a reply of its own.
DATA_NEED_RCPT = "503 Error: need RCPT command"
DATA_SYNTAX = "501 Syntax: DATA"
DATA_START = "354 End data with <CR><LF>.<CR><LF>"
DATA_OK = "250 OK"
# The end of a DATA refused by the reader (relay/smtp/data.py); aiosmtpd's own codes, with
# the enhanced status codes it leaves out (RFC 3463: 5.3.4 too big, 5.5.6 syntax of content).
DATA_TOO_MUCH = "552 5.3.4 Message too big for system"
LINE_TOO_LONG = "500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)"

# The code of the reply to a delivered message's DATA; delivery.finished logs it.
MESSAGE_ACCEPTED_CODE = 250


def message_accepted(queue_id: str) -> str:
    """The reply to DATA once the upstream has accepted the message."""
    return f"{MESSAGE_ACCEPTED_CODE} 2.0.0 Message accepted for delivery as {queue_id}"
