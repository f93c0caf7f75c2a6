"""relay/delivery/capture.py, the development upstream: every message one ``.eml`` file in
the capture folder, holding the message's content; a folder that cannot be written is a
temporary refusal, and the upstream says it is not reachable."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relay.delivery.capture import CaptureUpstream
from relay.errors import UpstreamUnavailableError
from relay.message.wire import Outgoing, stuff
from tests.conftest import message


async def capture(upstream: CaptureUpstream, content: bytes) -> str:
    session = await upstream.begin("agent@kw.test", [], smtputf8=False)
    await session.rcpt("a@example.test", [])
    try:
        return await session.data(Outgoing((stuff(content),)))
    finally:
        await session.release(reusable=True)


async def test_each_message_is_one_file_of_its_content(tmp_path: Path) -> None:
    """The folder is made when missing; each message gets a file of its own, named by the
    returned reply, and no partial file is left behind."""
    folder = tmp_path / "state" / "capture"
    upstream = CaptureUpstream(folder)
    assert folder.is_dir() and upstream.reachable()
    first, second = message(subject="one"), message(subject="two", body=".dot\r\n")
    names = [await capture(upstream, first), await capture(upstream, second)]
    assert len(set(names)) == 2
    assert [(folder / name).read_bytes() for name in names] == [first, second]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert all(name.endswith(".eml") for name in names)


async def test_a_folder_gone_is_a_temporary_refusal_and_not_reachable(tmp_path: Path) -> None:
    folder = tmp_path / "capture"
    upstream = CaptureUpstream(folder)
    folder.rmdir()
    assert upstream.reachable() is False
    with capture_logs() as logs, pytest.raises(UpstreamUnavailableError) as refused:
        await capture(upstream, message())
    assert refused.value.reply == "451 4.4.1 Capture folder not writable, try again later"
    [failed] = [e for e in logs if e["event"] == "capture.write_failed"]
    assert failed["log_level"] == "error" and failed["path"] == str(folder)

