"""aiosmtpd adapted to the relay: the session types (a leaf), the protocol and its hooks, the DATA
reader, the PROXY header, connection admission, TLS, graceful shutdown, and the per-message
Transaction that ties a message's stages together.

May import every stage below it (events, decisions, delivery, identity, message, config,
observe, store, errors); nothing below imports it.
"""
