"""What the relay tells the CRM and the user: the event stream (XADD), the list of event kinds,
the notifier that turns events into emails and webhooks, and its channels.

May import decisions, delivery and everything below them; never smtp.
"""
