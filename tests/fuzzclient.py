"""A blocking raw-socket SMTP client for the session fuzzer: it sends exactly the bytes it is
given, reads replies with a hang bound, can switch to TLS mid-session and can vanish with an
RST at any point."""

from __future__ import annotations

import socket
import ssl
import struct

# A reply (or the close the model expects) later than this is a hang: a generous bound, a
# hang detector, not a performance figure.
REPLY_BOUND = 10.0


class HangError(AssertionError):
    """The relay neither answered nor closed within REPLY_BOUND."""


def _client_tls() -> ssl.SSLContext:
    # No CA store loaded (the relay's certificate is self-signed): loading it costs 0.1 s.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


CLIENT_TLS = _client_tls()


class Client:
    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port),
                                                            timeout=REPLY_BOUND)
        self._buffer = b""
        self.closed = False

    def send(self, data: bytes) -> bool:
        """False when the relay had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise HangError(f"no reply within {REPLY_BOUND} s") from None
            except (ConnectionError, ssl.SSLError, OSError):
                chunk = b""
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def reply(self) -> tuple[int, str]:
        """One reply: (code, all its text); (0, partial text) when the connection closed."""
        lines: list[str] = []
        while True:
            line = self._line()
            if not line.endswith(b"\n"):
                self.closed = True
                return 0, "\n".join([*lines, line.decode("utf-8", "replace")])
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                code = int(text[:3]) if text[:3].isdigit() else -1
                return code, "\n".join(lines)

    def wait_closed(self) -> bytes:
        """Whatever the relay sends until it closes; HangError if it does not close."""
        data = self._buffer
        self._buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise HangError(f"connection not closed within {REPLY_BOUND} s") from None
            except (ConnectionError, ssl.SSLError, OSError):
                chunk = b""
            if not chunk:
                self.closed = True
                return data
            data += chunk

    def starttls(self) -> str | None:
        """The TLS handshake after a 220; None when it worked, else why it failed."""
        if self._buffer:
            return "bytes after the 220"
        self.sock = CLIENT_TLS.wrap_socket(self.sock, do_handshake_on_connect=False)
        try:
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.close()
            return type(exc).__name__
        return None

    def reset(self) -> None:
        """Vanish: close with an RST (SO_LINGER 0)."""
        try:
            raw = self.sock
            if isinstance(raw, ssl.SSLSocket):
                raw = socket.socket(fileno=raw.detach())
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        except OSError:
            pass
        self.closed = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True
