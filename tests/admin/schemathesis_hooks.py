"""Schemathesis extension hooks for tests/admin/test_api_schema.py (loaded through
SCHEMATHESIS_HOOKS): how a body of media type application/x-ndjson (POST /v1/user-imports)
goes on the wire, which schemathesis has no serializer for: as text, the way it sends text/csv
and any other text/* type."""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias("application/x-ndjson", "text/plain")
