"""The message bytes: the wire form of a received message, header edits, and the X-KW-*
control headers apps set.

Imports nothing of the relay but errors.
"""
