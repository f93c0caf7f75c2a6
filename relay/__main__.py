"""``python -m relay``: the same as the ``command-relay`` console script."""

import sys

from relay.cli.main import main

sys.exit(main())
