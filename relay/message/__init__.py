"""The message bytes: the wire form of a received message, header edits, the X-KW-*
control headers apps set, and the one-click unsubscribe headers (RFC 8058).

Imports nothing of the relay but errors.
"""
