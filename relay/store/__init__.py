"""Redis: the client (one server, Sentinel or Cluster), the URL forms, every key name, the
Lua loader and the embedded development server.

Imports nothing of the relay but errors.
"""
