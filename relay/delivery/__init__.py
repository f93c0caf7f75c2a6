"""Sending to the providers: upstream pools and sessions, routes and their failover, the route
credentials (e.g. Mailchimp keys, encrypted at rest), and the capture upstream for
development. No quota here.

May import identity, observe, config, store, message and errors; never decisions or smtp.
"""
