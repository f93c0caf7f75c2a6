"""aiosmtpd adapted to the relay: the session types (a leaf), the protocol (``RelaySMTP``, built
of the connection base and one mixin per job: admission with the PROXY header, the timers,
DATA with its bulk reader) and its hooks, the command syntax, TLS, graceful shutdown, and the
per-message Transaction that ties a message's stages together (its flow in ``transaction``,
its state and records in ``record``), with the checks it calls: ``screening`` (the
suppression list), ``unsubscribe`` (RFC 8058 headers), ``resubmission`` (deduplication).

May import every stage below it (events, decisions, delivery, identity, message, config,
observe, store, errors); nothing below imports it.
"""
