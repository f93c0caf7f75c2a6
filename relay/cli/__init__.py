"""The command line only: its grammar, the operator commands, and ``main``.

``command-relay`` (and ``python -m relay``) start at ``main``.
"""

from relay.cli.main import main

__all__ = ["main"]
