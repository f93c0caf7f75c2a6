"""The relay's benchmark: ``python -m bench`` from the repository root.

Starts a Redis, an upstream sink (Postfix's ``smtp-sink``), the relay as a real
``command-relay serve`` subprocess and, when it can, a throwaway Postfix, all on 127.0.0.1
with ephemeral ports; drives them with the async load generator in ``bench.loadgen``; prints
a table and writes ``bench/results/<timestamp>.json`` and ``.md``. Measures only: nothing in
here changes how the relay works. See ``bench/README.md``.
"""
