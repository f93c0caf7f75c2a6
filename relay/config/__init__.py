"""Settings (environment and file), the policy files (plans, notifications, routing) and
their reload (pure: read, validate, diff), time zones.

May import store, message and errors.
"""
