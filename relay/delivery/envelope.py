"""MAIL FROM and RCPT TO to the upstream, as aiosmtplib's ``mail`` and ``rcpt`` send them.

aiosmtplib quotes every address through ``email.utils.parseaddr`` (about 25 µs a command,
3 % of the relay's CPU per message in the profile, bench/README.md). For the common shape,
``dot-atom@hostname`` (relay/message/paths.py), that parser gives the address back as it
is, so the command is written here directly; any other address (a quoted local part, an
address literal, a non-ASCII address) still goes through aiosmtplib. The replies are checked
as aiosmtplib does, and refused with the same exceptions, so ``translate_error`` sees no
difference.
"""

from __future__ import annotations

import aiosmtplib
from aiosmtplib import SMTPStatus

from relay.message.paths import is_simple_address


async def mail(client: aiosmtplib.SMTP, sender: str, options: list[str],
               encoding: str) -> None:
    """MAIL FROM:<sender> with ``options``. Raises what ``aiosmtplib.SMTP.mail`` raises."""
    if sender and not is_simple_address(sender):
        await client.mail(sender, options=options, encoding=encoding)
        return
    response = await client.execute_command(
        b"MAIL", b"FROM:<" + sender.encode("ascii") + b">",
        *(option.encode("ascii") for option in options))
    if response.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)


async def rcpt(client: aiosmtplib.SMTP, recipient: str, options: list[str],
               encoding: str) -> None:
    """RCPT TO:<recipient> with ``options``. Raises what ``aiosmtplib.SMTP.rcpt`` raises."""
    if not is_simple_address(recipient):
        await client.rcpt(recipient, options=options, encoding=encoding)
        return
    response = await client.execute_command(
        b"RCPT", b"TO:<" + recipient.encode("ascii") + b">",
        *(option.encode("ascii") for option in options))
    if response.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
